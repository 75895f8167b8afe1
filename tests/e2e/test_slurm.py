"""launch/slurm/train.sbatch on a real single-host Slurm (docs/launch.md): a short run finishes with its
metrics; SIGTERM to a running job saves its step, and the requeued job resumes from it with no step
counted twice; an allocation that does not fit the config fails before training starts.

The `slurm` fixture writes a slurm.conf for this host (one node, its CPUs), starts munged (unless one
runs), slurmctld and slurmd, and stops what it started by their pid files. Without slurmctld the
tests skip, except under CI (`CI` set), where they fail: .ci/run installs slurm-wlm and munge.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, tiny_overrides

# One pytest-xdist worker runs the whole module: its fixture is one cluster on this host.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("slurm")]

SUBMIT = os.path.join(REPO_ROOT, "launch", "slurm", "submit.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done


def _start_munge(env: dict) -> str | None:
    """munged as the munge user with a key of its own (unless one already answers); its pid file, or
    None when a running munged was reused."""
    if shutil.which("munge") and _run(["sh", "-c", "munge -n | unmunge"], env, check=False).returncode == 0:
        return None
    key = "/etc/munge/munge.key"
    if not os.path.exists(key):
        os.makedirs("/etc/munge", exist_ok=True)
        with open(key, "wb") as f:
            f.write(secrets.token_bytes(128))
        shutil.chown(key, "munge", "munge")
        os.chmod(key, 0o400)
    for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        os.makedirs(d, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    _run(["runuser", "-u", "munge", "--", "munged"], env)
    return "/run/munge/munged.pid"


SLURM_CONF = """\
ClusterName=foldtron-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
KillWait=30
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster on this host for the module's tests; yields the client environment."""
    if shutil.which("slurmctld") is None or shutil.which("slurmd") is None:
        message = "slurmctld/slurmd not installed (apt-get install slurm-wlm munge; .ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {message}")
        pytest.skip(message)
    if os.geteuid() != 0:
        pytest.skip("the single-host Slurm fixture runs its daemons as root")
    tmp = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool"):
        (tmp / d).mkdir()
    conf = tmp / "slurm.conf"
    host = socket.gethostname().split(".")[0]
    conf.write_text(SLURM_CONF.format(host=host, tmp=tmp, cpus=os.cpu_count(), ctld_port=_free_port(),
                                      d_port=_free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pid_files = []
    try:
        munge_pid = _start_munge(env)
        if munge_pid:
            pid_files.append(munge_pid)
        _run(["slurmctld", "-f", str(conf)], env)
        pid_files.append(str(tmp / "slurmctld.pid"))
        _run(["slurmd", "-f", str(conf), "-N", host], env)
        pid_files.append(str(tmp / "slurmd.pid"))
        deadline = time.monotonic() + 60
        while _run(["sinfo", "-h", "-o", "%t"], env, check=False).stdout.strip() not in ("idle", "mix", "alloc"):
            if time.monotonic() > deadline:
                log = (tmp / "slurmctld.log").read_text()[-2000:] if (tmp / "slurmctld.log").exists() else ""
                pytest.fail(f"the Slurm node did not come up: {_run(['sinfo'], env, check=False).stdout}\n{log}")
            time.sleep(0.5)
        yield {**env, "FOLDTRON_RDZV_HOST": "127.0.0.1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    finally:
        _cancel_all(env)
        for pid_file in reversed(pid_files):  # slurmd, slurmctld, then munged if it is ours
            _stop(pid_file)


def _cancel_all(env: dict) -> None:
    """Kill whatever job is left (a failed test's), and wait for it to go: stopping slurmd would leave
    its job steps running."""
    jobs = _run(["squeue", "-h", "-o", "%i"], env, check=False).stdout.split()
    if not jobs:
        return
    _run(["scancel", "--signal=KILL", "--full", *jobs], env, check=False)
    deadline = time.monotonic() + 60
    while _run(["squeue", "-h", "-o", "%i"], env, check=False).stdout.split() and time.monotonic() < deadline:
        time.sleep(0.5)


def _stop(pid_file: str) -> None:
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def _submit(env: dict, tmp_path, run_dir, overrides: list[str], nproc: int = 2) -> str:
    done = _run([sys.executable, SUBMIT, "--nodes", "1", "--nproc-per-node", str(nproc), "--job-name", "e2e",
                 "--run-dir", str(run_dir), "--log-dir", str(tmp_path / "logs"), "--", *overrides], env, cwd=REPO_ROOT,
                timeout=300)  # it composes and validates the config: seconds, minutes on a loaded machine
    return done.stdout.strip().splitlines()[-1]


def _job(env: dict, job: str) -> dict[str, str]:
    text = _run(["scontrol", "show", "job", "-o", job], env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _wait_job(env: dict, job: str, states: tuple[str, ...], timeout: float = 600) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        info = _job(env, job)
        if info.get("JobState") in states:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} still {info.get('JobState')} after {timeout}s: {info}")
        time.sleep(0.5)


def _metrics(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _logs(tmp_path, run_dir) -> str:
    texts = []
    for d in (tmp_path / "logs", run_dir / "logs"):
        if d.exists():
            texts += [f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(d.iterdir())]
    return "\n".join(texts)


def _tiny(tmp_path, steps: int) -> list[str]:
    # trainer.run_dir comes from the job (FOLDTRON_RUN_DIR), appended last by the batch script.
    return tiny_overrides(tmp_path, steps=steps) + ["trainer.eval_interval=0", "trainer.eval_at_end=false"]


def test_sigterm_saves_and_the_requeued_job_resumes_from_that_step(slurm, tmp_path):
    run_dir = tmp_path / "run"
    steps = 120
    job = _submit(slurm, tmp_path, run_dir, _tiny(tmp_path, steps=steps) + ["trainer.save_final=false"])
    deadline = time.monotonic() + 600
    while not _metrics(run_dir) or _metrics(run_dir)[-1]["step"] < 2:
        assert _job(slurm, job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), _logs(tmp_path, run_dir)
        assert time.monotonic() < deadline, _logs(tmp_path, run_dir)
        time.sleep(0.2)
    _run(["scancel", "--signal=TERM", job], slurm)
    info = _wait_job(slurm, job, ("COMPLETED", "FAILED", "CANCELLED"))
    stopped = _metrics(run_dir)[-1]["step"]
    assert stopped < steps, "the job finished before the signal: raise the step count"
    assert info["ExitCode"].startswith("75:"), (info, _logs(tmp_path, run_dir))
    assert sorted(os.listdir(run_dir / "checkpoints")) == [f"step_{stopped:06d}"], _logs(tmp_path, run_dir)

    # slurmd refuses a job whose new credential is not newer, to the second, than the revocation of the
    # old one ("Job credential revoked"): a scheduler's requeue comes later than this anyway.
    time.sleep(2)
    _run(["scontrol", "requeue", job], slurm)
    _run(["scontrol", "update", f"jobid={job}", "starttime=now"], slurm)  # a requeued job waits on BeginTime
    info = _wait_job(slurm, job, ("COMPLETED", "FAILED"))
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", (info, _logs(tmp_path, run_dir))
    assert [r["step"] for r in _metrics(run_dir)] == list(range(1, steps + 1))  # no step counted twice
    log = (run_dir / "train.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:06d}'} at step {stopped}" in log
    # The whole job: both ranks of the node, logs per job and per requeue, the final checkpoint.
    assert "dp=2" in log
    logs = {p.name for p in (run_dir / "logs").iterdir()}
    assert any(n.startswith(f"job{job}-requeue0-node") for n in logs), logs
    assert any(n.startswith(f"job{job}-requeue1-node") for n in logs), logs


def test_an_allocation_that_does_not_fit_fails_before_training(slurm, tmp_path):
    run_dir = tmp_path / "run"
    # tp=2 over 3 ranks: the in-job check refuses the allocation; nothing is trained.
    env = {**slurm, "NPROC_PER_NODE": "3"}
    done = _run(["sbatch", "--parsable", "--nodes=1", f"--output={tmp_path / 'job.out'}", f"--chdir={REPO_ROOT}",
                 "--export=ALL", os.path.join(REPO_ROOT, "launch", "slurm", "train.sbatch"),
                 *_tiny(tmp_path, steps=2), "parallel.tp=2"], {**env, "FOLDTRON_RUN_DIR": str(run_dir)})
    job = done.stdout.strip().split(";")[0]
    info = _wait_job(slurm, job, ("COMPLETED", "FAILED"))
    out = (tmp_path / "job.out").read_text()
    assert info["ExitCode"].startswith("2:"), out
    assert "foldtron: error: parallel.tp=2" in out and "(the Slurm job has 1 node(s) x 3 rank(s) = 3 ranks)" in out
    assert not (run_dir / "metrics.jsonl").exists()
