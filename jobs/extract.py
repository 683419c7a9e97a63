"""`ray job submit ... -- python jobs/extract.py users|items|perceptions --config NAME --run-dir DIR [...]`.

The extraction stages as a Ray job: the same stage functions as `cotrec extract`, connected to
the cluster the job runs on (RAY_ADDRESS, which `ray job submit` sets).
"""

import sys

from cotrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
