"""`ray job submit ... -- python jobs/evaluate.py --via-serve --run-dir R --url http://SERVE:8000 --ranker llm++`.

Scaled evaluation: every test user through the deployed Serve chain (without --url, the job
deploys the app on the cluster itself, evaluates, and takes it down).
"""

import sys

from cotrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
