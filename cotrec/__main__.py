from cotrec.cli import main

raise SystemExit(main())
