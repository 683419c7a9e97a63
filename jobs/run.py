"""`ray job submit ... -- python jobs/run.py --config demo --run-dir R`: the main job, every stage."""

import sys

from cotrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
