"""Export a checkpoint of any parallel layout as one consolidated model (docs/checkpoints.md).

    python launch/export.py runs/quickstart/RUN/checkpoints/step_000200 exported/ --dtype bf16

writes exported/model.safetensors (foldtron's global parameter names, one process's shapes, no
vocabulary padding) and exported/config.yaml (the run's config, model.* included). Training loads
it with trainer.load=exported/.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from parallel_state.errors import ConfigError
from trainer.checkpoint_export import DTYPES, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoints/step_XXXXXX directory (any layout)")
    parser.add_argument("out", help="output directory (model.safetensors + config.yaml)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the exported weights")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out, args.dtype)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
