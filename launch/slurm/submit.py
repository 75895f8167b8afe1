"""Submit foldtron to Slurm, and check an allocation before training starts (docs/launch.md).

    python launch/slurm/submit.py --nodes 2 --nproc-per-node 8 --time 04:00:00 -- \\
        +experiment=quickstart parallel.tp=2 trainer.time_limit=230

checks that the config fits nodes x ranks per node (every `parallel.*` rule, before anything is
queued), then runs `sbatch launch/slurm/train.sbatch` with the overrides. Inside the job, the batch
script runs `submit.py check`, which refuses an allocation whose task layout does not match: one
srun task per node (each a torchrun agent) and a world the config can use.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # run from a checkout

from parallel_state.errors import ConfigError

SBATCH_SCRIPT = os.path.join(ROOT, "launch", "slurm", "train.sbatch")


def allocation_nodes(environ: Mapping[str, str], nnodes: int) -> int:
    """The job's node count, after checking that Slurm gave one task per node (the batch script's srun
    starts one torchrun agent per node, which starts the ranks). Raises ConfigError otherwise."""
    ntasks = environ.get("SLURM_NTASKS")
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "")
    if ntasks is not None and int(ntasks) != nnodes:
        raise ConfigError("SLURM_NTASKS", int(ntasks),
                          f"the allocation has {ntasks} tasks on {nnodes} node(s) (SLURM_NTASKS_PER_NODE={per_node}), "
                          "but launch/slurm/train.sbatch runs one task per node: a torchrun agent that starts "
                          "NPROC_PER_NODE ranks",
                          f"submit with --ntasks-per-node=1 and NPROC_PER_NODE={per_node.split('(')[0] or 'N'} "
                          "(launch/slurm/submit.py --nproc-per-node does both)")
    return nnodes


def check_layout(overrides: Sequence[str], nnodes: int, nproc_per_node: int) -> int:
    """Validate the config composed from `overrides` for nnodes x nproc_per_node ranks; returns the world
    size. A config that does not fit raises ConfigError naming the allocation."""
    from trainer.config import compose
    from trainer.validation import validate

    if nnodes < 1 or nproc_per_node < 1:
        raise ConfigError("--nodes/--nproc-per-node", f"{nnodes}x{nproc_per_node}", "must both be >= 1",
                          "ask for at least one node and one rank per node")
    world = nnodes * nproc_per_node
    # The batch script adds these; a placeholder run directory stands for the job's own.
    cfg = compose([*overrides, "trainer.resume=auto", "trainer.run_dir=runs/slurm-layout-check"])
    try:
        validate(cfg, world)
    except ConfigError as e:
        raise ConfigError(e.field, e.value, f"{e.problem} (the Slurm job has {nnodes} node(s) x {nproc_per_node} "
                          f"rank(s) = {world} ranks)",
                          f"{e.fix}; or change --nodes / --nproc-per-node so that the world size fits") from e
    return world


def sbatch_command(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
    exports = [f"NPROC_PER_NODE={args.nproc_per_node}", f"MAX_RESTARTS={args.max_restarts}", f"FOLDTRON_ROOT={ROOT}"]
    if args.requeue_on_stop:
        exports.append("FOLDTRON_REQUEUE_ON_STOP=1")
    if args.run_dir:
        exports.append(f"FOLDTRON_RUN_DIR={os.path.abspath(args.run_dir)}")
    cmd = ["sbatch", "--parsable", f"--nodes={args.nodes}", "--ntasks-per-node=1", f"--job-name={args.job_name}",
           f"--chdir={ROOT}", f"--output={os.path.join(args.log_dir, '%x-%j.out')}",
           "--export=ALL," + ",".join(exports)]
    if args.time:
        cmd.append(f"--time={args.time}")
    if args.partition:
        cmd.append(f"--partition={args.partition}")
    if args.gpus_per_node:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    return [*cmd, *args.sbatch_arg, SBATCH_SCRIPT, *overrides]


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    own, overrides = _split(sys.argv[1:] if argv is None else argv)
    if own[:1] == ["check"]:
        parser = argparse.ArgumentParser(prog="submit.py check", description="check the job's allocation")
        parser.add_argument("--nnodes", type=int, required=True)
        parser.add_argument("--nproc-per-node", type=int, required=True)
        args = parser.parse_args(own[1:])
        try:
            nodes = allocation_nodes(os.environ, args.nnodes)
            check_layout(overrides, nodes, args.nproc_per_node)
        except ConfigError as e:
            print(f"foldtron: error: {e}", file=sys.stderr)
            return 2
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Hydra overrides for launch/train.py follow `--`.")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--nproc-per-node", type=int, default=1, help="ranks per node (GPUs per node)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="--gpus-per-node for sbatch")
    parser.add_argument("--time", default=None, help="Slurm time limit, e.g. 04:00:00")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--job-name", default="foldtron")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun --max-restarts inside the job")
    parser.add_argument("--requeue-on-stop", action="store_true",
                        help="requeue the job when training stops on SIGTERM or trainer.time_limit (status 75)")
    parser.add_argument("--run-dir", default=None,
                        help="the job's fixed run directory (default: runs/<job name>/slurm-<job id>)")
    parser.add_argument("--log-dir", default=os.path.join(ROOT, "logs"), help="where sbatch writes %%x-%%j.out")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="an extra sbatch argument (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="check and print the sbatch command only")
    args = parser.parse_args(own)
    try:
        world = check_layout(overrides, args.nodes, args.nproc_per_node)
    except ConfigError as e:
        print(f"foldtron: error: {e}", file=sys.stderr)
        return 2
    cmd = sbatch_command(args, overrides)
    print(f"foldtron: {args.nodes} node(s) x {args.nproc_per_node} rank(s) = {world} ranks: {' '.join(cmd)}",
          file=sys.stderr)
    if args.dry_run:
        return 0
    os.makedirs(args.log_dir, exist_ok=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return done.returncode
    print(done.stdout.strip().split(";")[0])  # the job id
    return 0


if __name__ == "__main__":
    sys.exit(main())
