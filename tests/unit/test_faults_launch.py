"""launch/slurm/ without a cluster: the allocation checks of submit.py and the sbatch command it builds."""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess

import pytest

from parallel_state.errors import ConfigError
from tests.conftest import REPO_ROOT, tiny_overrides

SLURM_DIR = os.path.join(REPO_ROOT, "launch", "slurm")


@pytest.fixture(scope="module")
def submit():
    spec = importlib.util.spec_from_file_location("foldtron_slurm_submit", os.path.join(SLURM_DIR, "submit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_task_per_node(submit):
    assert submit.allocation_nodes({"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1(x2)"}, 2) == 2
    assert submit.allocation_nodes({}, 3) == 3  # no task count given: one per node, as the script asks
    with pytest.raises(ConfigError) as e:
        submit.allocation_nodes({"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8(x2)"}, 2)
    text = str(e.value)
    assert text.startswith("SLURM_NTASKS=16: the allocation has 16 tasks on 2 node(s)")
    assert "Fix: submit with --ntasks-per-node=1 and NPROC_PER_NODE=8" in text


def test_a_world_the_config_cannot_use_is_refused_with_the_allocation_named(submit, tmp_path):
    overrides = tiny_overrides(tmp_path) + ["parallel.tp=2"]
    assert submit.check_layout(overrides, nnodes=2, nproc_per_node=2) == 4
    with pytest.raises(ConfigError) as e:
        submit.check_layout(overrides, nnodes=1, nproc_per_node=3)
    assert e.value.field == "parallel.tp"
    assert "(the Slurm job has 1 node(s) x 3 rank(s) = 3 ranks)" in str(e.value)
    assert "change --nodes / --nproc-per-node" in str(e.value)
    with pytest.raises(ConfigError, match="must both be >= 1"):
        submit.check_layout(overrides, nnodes=0, nproc_per_node=2)


def test_sbatch_command(submit):
    args = argparse.Namespace(nodes=2, nproc_per_node=8, max_restarts=3, requeue_on_stop=True, run_dir="runs/x",
                              job_name="llama", log_dir="/logs", time="04:00:00", partition="gpu",
                              gpus_per_node=8, sbatch_arg=["--exclusive"])
    cmd = submit.sbatch_command(args, ["+experiment=quickstart", "parallel.tp=2"])
    assert cmd[:2] == ["sbatch", "--parsable"] and "--nodes=2" in cmd and "--ntasks-per-node=1" in cmd
    assert "--time=04:00:00" in cmd and "--partition=gpu" in cmd and "--gpus-per-node=8" in cmd
    assert "--exclusive" in cmd and "--output=/logs/%x-%j.out" in cmd
    exports = next(a for a in cmd if a.startswith("--export="))
    assert exports.startswith("--export=ALL,NPROC_PER_NODE=8,MAX_RESTARTS=3,")
    assert "FOLDTRON_REQUEUE_ON_STOP=1" in exports and f"FOLDTRON_RUN_DIR={os.path.abspath('runs/x')}" in exports
    assert cmd[-3:] == [os.path.join(SLURM_DIR, "train.sbatch"), "+experiment=quickstart", "parallel.tp=2"]


def test_batch_script_parses_and_asks_for_requeue_and_one_task_per_node():
    script = os.path.join(SLURM_DIR, "train.sbatch")
    assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
    with open(script) as f:
        text = f.read()
    for line in ("#SBATCH --requeue", "#SBATCH --ntasks-per-node=1", "trainer.resume=auto", "--rdzv-backend=c10d",
                 "trap forward_term TERM", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "submit.py check"):
        assert line in text, line
