"""`ray job submit ... -- python jobs/ranker.py grid --config ml-100k --run-dir R`.

The ranker stages: `train --retriever preference/description --prompt llm++` (LoRA + DeepSpeed on
Ray Train), `eval ... [--zero-shot]`, or `grid` (Table 2).
"""

import sys

from cotrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["ranker", *sys.argv[1:]]))
