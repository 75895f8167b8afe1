"""Write RUN_DIR/report.html: plots of a finished or running run, self-contained (PNGs embedded).

    python launch/report.py RUN_DIR
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from trainer.metrics import METRICS_FILE
from trainer.report import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (trainer.run_dir) holding metrics.jsonl")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.run_dir, METRICS_FILE)):
        print(f"foldtron: error: {args.run_dir} has no {METRICS_FILE}. Fix: pass a run directory "
              "(trainer.run_dir of a run that has logged at least one step)", file=sys.stderr)
        return 2
    path, figures = render(args.run_dir)
    empty = [f.title for f in figures if f.png is None]
    print(f"wrote {path} ({len(figures) - len(empty)} figures" + (f"; without data: {', '.join(empty)})" if empty else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
