"""`ray job submit ... -- python jobs/prepare.py --config ml-100k --run-dir R`: the prepare stage."""

import sys

from cotrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
