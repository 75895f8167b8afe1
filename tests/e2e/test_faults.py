"""Faults and multi-node launch end to end (docs/launch.md): two torchrun agents as two nodes reproduce
the one-process losses; SIGTERM to torchrun saves and exits 75; a killed rank under --max-restarts
resumes from the newest complete checkpoint with no step counted twice."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, tiny_overrides
from tests.e2e.test_torchrun import _descendants, _signal_all

# One pytest-xdist worker runs the module, so its one-process reference run happens once.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e_faults")]

STEPS = 16
TRAIN = os.path.join(REPO_ROOT, "launch", "train.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(torchrun_args: list[str], overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, TRAIN, *overrides]
    # A fresh store per restart (trainer.faults.restart_store_warning): what launch/slurm/train.sbatch sets.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = _descendants(proc.pid)
        _signal_all(workers, signal.SIGUSR1)  # launch/train.py prints every thread's stack on SIGUSR1
        time.sleep(3)
        _signal_all([proc.pid, *workers], signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout}s; stacks:\n{err[-8000:]}")
    return proc.returncode, out, err


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in _metrics(run_dir) if "loss" in r]


def _tiny(tmp_path, run_dir) -> list[str]:
    return tiny_overrides(tmp_path, run_dir=run_dir, steps=STEPS) + ["trainer.eval_interval=0",
                                                                      "trainer.eval_at_end=false"]


# Session-scoped: xdist interleaves other modules' tests, which would tear a module fixture down
# and run it again; its xdist group keeps every user on one worker.
@pytest.fixture(scope="session")
def one_process_losses(tmp_path_factory) -> list[float]:
    tmp = tmp_path_factory.mktemp("faults_reference")
    rc, out, err = _finish(_start(["--standalone", "--nproc-per-node=1"], _tiny(tmp, tmp / "one")))
    assert rc == 0, out[-2000:] + err[-3000:]
    return _losses(tmp / "one")


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the training workers under a torchrun agent."""
    found = {}
    for pid in _descendants(agent_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"launch/train.py" in cmdline and b"LOCAL_RANK" in env:
            found[int(env[b"LOCAL_RANK"])] = pid
    return found


def _wait_for(path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.1)


def _wait_for_step(run_dir, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (os.path.exists(run_dir / "metrics.jsonl") and _metrics(run_dir) and _metrics(run_dir)[-1]["step"] >= step):
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached within {timeout}s"
        time.sleep(0.1)


def test_two_torchrun_agents_as_two_nodes_match_one_process(tmp_path, one_process_losses):
    """--nnodes=2 with c10d rendezvous on this machine, 2 ranks per node, tp2 x dp2."""
    endpoint = f"127.0.0.1:{_free_port()}"
    run_dir = tmp_path / "multinode"
    overrides = _tiny(tmp_path, run_dir) + ["parallel.tp=2"]
    agents = [_start(["--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint={endpoint}", "--rdzv-id=e2e-multinode"], overrides)
              for node in (0, 1)]
    results = [_finish(agent, timeout=300) for agent in agents]
    for rc, out, err in results:
        assert rc == 0, out[-2000:] + err[-3000:]
    assert "tp=2" in "".join(out for _, out, _ in results) and "dp=2" in "".join(out for _, out, _ in results)
    assert _losses(run_dir) == pytest.approx(one_process_losses, rel=1e-5)


def test_sigterm_saves_the_step_and_exits_75(tmp_path):
    """SIGTERM to the training processes (what Slurm sends to every process of a job step before
    killing it): every rank finishes its step, they save it together and exit with status 75."""
    run_dir = tmp_path / "sigterm"
    agent = _start(["--standalone", "--nproc-per-node=2"],
                   tiny_overrides(tmp_path, run_dir=run_dir, steps=2000) + ["trainer.eval_interval=0",
                                                                              "trainer.save_final=false"])
    _wait_for_step(run_dir, 1, agent)  # training (before its first step a SIGTERM just ends the process)
    _signal_all([_worker_pids(agent.pid)[1]], signal.SIGTERM)  # one rank is enough: the stop is agreed
    rc, _, err = _finish(agent)
    assert rc != 0 and len(re.findall(r"exitcode\s+:\s*75", err)) == 2, err[-3000:]  # torchrun's summary
    stopped = re.findall(r"foldtron: stopped after step (\d+) \(([^)]*)\)", err)
    step = _metrics(run_dir)[-1]["step"]
    assert sorted(stopped) == sorted([(str(step), "SIGTERM received"), (str(step), "a signal reached another rank")])
    assert os.listdir(run_dir / "checkpoints") == [f"step_{step:06d}"]
    assert os.path.exists(run_dir / "checkpoints" / f"step_{step:06d}" / "meta.json")


def test_killed_rank_restarts_and_resumes_without_counting_a_step_twice(tmp_path, one_process_losses):
    run_dir = tmp_path / "restart"
    overrides = _tiny(tmp_path, run_dir) + ["trainer.save_interval=4", "trainer.resume=auto", "trainer.keep_last=0"]
    agent = _start(["--standalone", "--nproc-per-node=2", "--max-restarts=1", "--monitor-interval=0.2"], overrides)
    _wait_for(run_dir / "checkpoints" / "step_000008" / "meta.json", agent)
    rank1 = _worker_pids(agent.pid)[1]
    os.kill(rank1, signal.SIGSTOP)  # hold it (its peer then waits in a collective): the run cannot finish first
    reached = _metrics(run_dir)[-1]["step"]
    os.kill(rank1, signal.SIGKILL)
    rc, out, err = _finish(agent)
    assert rc == 0, out[-2000:] + err[-3000:]
    assert "resumed from" in out and "closed its connection" in err  # the survivor named the dead peer
    steps = [r["step"] for r in _metrics(run_dir)]
    assert steps == list(range(1, STEPS + 1)), steps  # the rolled-back rows were dropped, none repeated
    assert reached < STEPS
    assert _losses(run_dir) == pytest.approx(one_process_losses, rel=1e-5)
