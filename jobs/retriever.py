"""`ray job submit ... -- python jobs/retriever.py grid --config ml-100k --run-dir R --seeds 5`.

The retriever stages: `train --variant preference/description` (one variant) or `grid` (Table 1).
"""

import sys

from cotrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["retriever", *sys.argv[1:]]))
