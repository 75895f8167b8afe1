"""Print a parallel layout: each rank's coordinates on the dense and expert grids, its experts, and
every group list.

    python launch/topology.py --world 16 --tp 2 --cp 2 --pp 2 --ep 4 --etp 1 --num-experts 8
    python launch/topology.py --world 16 +experiment=quickstart parallel.tp=2 parallel.pp=2
    python launch/topology.py --world 16 --tp 2 --workers 2      # CO2 / local SGD workers (optim.co2.workers)

With Hydra overrides the sizes come from the composed training config (the same one launch/train.py
would run); the flags then only override it. Where the expert mesh is hard to picture (EP folded
over CP and DP), this shows which ranks exchange tokens and which ones average expert gradients.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from parallel_state.config import ParallelConfig
from parallel_state.errors import ConfigError
from parallel_state.topology import GROUP_NAMES, WORKER_GROUPS, Topology

GROUP_HELP = {
    "tp": "tensor parallel", "cp": "context parallel", "dp": "data parallel", "pp": "pipeline stages",
    "dp_cp": "dense gradient all-reduce", "tp_cp": "tp x cp", "tp_dp_cp": "one pipeline stage",
    "mp": "one model replica (tp x pp)", "embedding": "tied embedding: first + last stage",
    "ep": "expert parallel: token all-to-all", "etp": "expert tensor parallel",
    "edp": "expert gradient all-reduce", "etp_ep": "token dispatch (etp x ep)",
    "etp_ep_pp": "one expert replica (etp x ep x pp)",
    "worker": "one outer-optimizer worker (contiguous ranks)", "outer": "outer average: same place in every worker",
}


def render(topology: Topology, num_experts: int | None = None) -> str:
    """The whole printout as one string (pure, for tests)."""
    t = topology
    lines = [repr(t), ""]
    for label, grid in (("dense grid ", t.dense), ("expert grid", t.expert)):
        strides, stride = [], 1
        for name, size in zip(grid.names, grid.sizes):
            strides.append(f"{name}={size} (stride {stride})")
            stride *= size
        lines.append(f"{label}, fastest first: " + ", ".join(strides))
    lines.append("")
    workers = t.workers > 1  # the worker column and groups only where there are several
    header = (f"{'rank':>5} | {'tp':>3} {'cp':>3} {'dp':>3} {'pp':>3} | {'etp':>3} {'ep':>3} {'edp':>3} | "
              + (f"{'worker':>6} | " if workers else "") + "experts")
    lines += [header, "-" * len(header)]
    for r in range(t.world_size):
        c = t.coords(r)
        if num_experts is None:
            held = f"EP shard {c.ep} of {t.ep}"
        else:
            experts = t.experts_of(r, num_experts)
            held = f"{experts.start}" if len(experts) == 1 else f"{experts.start}-{experts.stop - 1}"
        worker = f"{c.worker:>6} | " if workers else ""
        lines.append(f"{r:>5} | {c.tp:>3} {c.cp:>3} {c.dp:>3} {c.pp:>3} | {c.etp:>3} {c.ep:>3} {c.edp:>3} | "
                     f"{worker}{held}")
    lines += ["", "groups:"]
    for name in GROUP_NAMES + (tuple(WORKER_GROUPS) if workers else ()):
        groups = t.groups(name)
        lines.append(f"  {name:<10} {GROUP_HELP[name]} ({len(groups)} groups of {len(groups[0])})")
        lines.append("    " + " ".join(str(g) for g in groups))
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Other arguments are Hydra overrides of the training config.")
    p.add_argument("--world", type=int, required=True, help="number of ranks")
    for axis in ("tp", "cp", "pp", "ep", "etp"):
        p.add_argument(f"--{axis}", type=int, default=None, help=f"parallel.{axis}")
    p.add_argument("--order", default=None, help="rank order, fastest axis first (parallel.order)")
    p.add_argument("--workers", type=int, default=None,
                   help="outer-optimizer workers, blocks of contiguous ranks (optim.co2.workers)")
    p.add_argument("--num-experts", type=int, default=None, help="experts per MoE layer, to list each rank's")
    return p.parse_known_args(argv)


def config_from(args: argparse.Namespace, overrides: list[str]) -> tuple[ParallelConfig, int | None, int]:
    """The parallel config (from the training config when overrides are given) with flags on top,
    the experts per MoE layer and the outer optimizer's workers."""
    num_experts = args.num_experts
    workers = 1
    if overrides:
        from trainer.config import compose

        cfg = compose(overrides)
        pcfg = cfg.parallel
        moe = getattr(cfg.model, "moe", None)
        if num_experts is None and moe is not None:
            num_experts = getattr(moe, "num_experts", None)
        workers = cfg.optim.co2.workers if cfg.optim.outer != "none" else 1
    else:
        pcfg = ParallelConfig()
    for axis in ("tp", "cp", "pp", "ep", "etp", "order"):
        value = getattr(args, axis)
        if value is not None:
            setattr(pcfg, axis, value)
    return pcfg, num_experts, workers if args.workers is None else args.workers


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    pcfg, num_experts, workers = config_from(args, overrides)
    try:
        print(render(Topology.from_config(pcfg, args.world, workers), num_experts))
    except ConfigError as e:
        print(f"foldtron: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
