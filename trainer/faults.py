"""Runs that survive faults: stop cleanly on SIGTERM or a time limit, say where a NaN/Inf started,
name a hung collective and dump every rank's stack, refuse restarts that would start over.

What each piece costs on a healthy step (docs/launch.md, "Faults"):
- `StopSignal`: one 1-element all-reduce (MAX over the world) per step, as Megatron's exit-signal
  handler and `--exit-duration-in-mins` do: every rank must stop after the same step.
- `diagnose_non_finite`: nothing; it re-runs the failed step's forward and backward with hooks only
  after a step came out non-finite.
- `HangWatch`: a daemon thread that asks the job's store for one key every `poll_s` seconds (what
  torch's NCCL heartbeat monitor does for its dump signal); the collective timeout itself is the
  process groups' (`parallel.timeout_s`).
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from parallel_state.errors import ConfigError
from trainer.checkpoint import list_checkpoints

log = logging.getLogger(__name__)

# Exit statuses of launch/train.py (documented in docs/launch.md).
EXIT_CONFIG = 2  # a bad setting, or a non-finite step under trainer.nan_policy=stop
EXIT_COLLECTIVE_TIMEOUT = 3  # a collective did not complete within parallel.timeout_s
EXIT_STOPPED = 75  # SIGTERM or trainer.time_limit: checkpoint saved, continue with trainer.resume=auto (EX_TEMPFAIL)

# Why a run stops early; the codes are all-reduced with MAX, so a signal wins over the time limit.
STOP_NONE, STOP_TIME_LIMIT, STOP_SIGNAL = 0, 1, 2

# Environment variable holding the job's start (seconds since the epoch): launch/slurm/train.sbatch
# sets it, so trainer.time_limit counts from the job's start, torchrun restarts included.
START_TIME_ENV = "FOLDTRON_START_TIME"


# ---- SIGTERM and the time limit --------------------------------------------------------------


class RunStopped(Exception):
    """Training stopped early at the end of a step (a signal or trainer.time_limit); its state is saved."""

    exit_code = EXIT_STOPPED

    def __init__(self, reason: str, step: int, checkpoint: str | None):
        self.reason, self.step, self.checkpoint = reason, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no new checkpoint (no step ran since the last one)"
        super().__init__(f"stopped after step {step} ({reason}); {where}. Continue with trainer.resume=auto "
                         f"and the same trainer.run_dir")


STOP_MARKER = "stopped.json"  # in the run directory: written when training stops early with a checkpoint


def write_stop_marker(run_dir: str, step: int, reason: str, checkpoint: str) -> None:
    """run_dir/stopped.json: a job script (launch/slurm/train.sbatch) reads it to tell a stop with a
    checkpoint (exit 75) from a failure, since torchrun exits with its own status when signalled."""
    with open(os.path.join(run_dir, STOP_MARKER), "w") as f:
        json.dump({"step": step, "reason": reason, "checkpoint": checkpoint, "time": time.time()}, f)


@dataclass
class StopSignal:
    """SIGTERM (the signal Slurm, torchrun and Kubernetes send before killing) and trainer.time_limit.

    The handler only sets a flag; the trainer asks `local_code()` after each step and agrees with the
    other ranks (a signal may reach them at different steps) before it saves and stops.
    """

    time_limit_min: float | None = None
    start_time: float = field(default_factory=time.time)  # seconds since the epoch
    signals: tuple[int, ...] = (signal.SIGTERM,)
    received: int | None = None  # the signal number once one arrived
    _previous: dict[int, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environ(cls, time_limit_min: float | None, environ: Mapping[str, str] | None = None) -> StopSignal:
        env = os.environ if environ is None else environ
        start = float(env[START_TIME_ENV]) if env.get(START_TIME_ENV) else time.time()
        return cls(time_limit_min=time_limit_min, start_time=start)

    def install(self) -> None:
        """Route the signals here (main thread only, as Python requires; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def local_code(self, now: float | None = None) -> int:
        """This rank's reason to stop: STOP_SIGNAL, STOP_TIME_LIMIT or STOP_NONE."""
        if self.received is not None:
            return STOP_SIGNAL
        if self.time_limit_min is not None:
            elapsed = (time.time() if now is None else now) - self.start_time
            if elapsed >= self.time_limit_min * 60.0:
                return STOP_TIME_LIMIT
        return STOP_NONE

    def describe(self, code: int) -> str:
        """The reason of an agreed stop code, as this rank saw it."""
        if code == STOP_SIGNAL:
            if self.received is None:
                return "a signal reached another rank"
            return f"{signal.Signals(self.received).name} received"
        return f"trainer.time_limit={self.time_limit_min} minutes reached"


# ---- NaN / Inf localisation ------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_CHUNK = re.compile(r"^chunks\.\d+\.")


def layer_of(name: str, num_layers: int) -> int:
    """Global layer index of a module or parameter name: -1 before the layers (embedding), num_layers
    after them (final norm, head)."""
    found = _LAYER.search(name)
    if found:
        return int(found.group(1))
    return -1 if "embed" in name else num_layers


def display_name(name: str) -> str:
    """The one-process name (pipeline chunks number layers globally already)."""
    return _CHUNK.sub("", name)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _non_finite(value: Any) -> bool:
    return any(t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()) for t in _tensors(value))


class NonFiniteProbe:
    """Hooks on every module of a model for one diagnostic re-run: the first module (in execution
    order) whose output went non-finite in forward, and the first whose output gradient did in
    backward. Registered only for the re-run, so healthy steps never pay for the checks."""

    def __init__(self, model: nn.Module, num_layers: int):
        self.num_layers = num_layers
        # Module name -> the hook call (counted over all modules) that first saw it non-finite. Ranks
        # running the same modules (TP, DP peers) count the same calls, so the counts compare across them.
        self.calls = {"forward": 0, "backward": 0}
        self.bad_forward: dict[str, int] = {}
        self.bad_backward: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._forward_hook(name))
                        for name, m in model.named_modules() if name]

    def _forward_hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            self.calls["forward"] += 1
            if _non_finite(output):
                self.bad_forward.setdefault(name, self.calls["forward"])
            for t in _tensors(output):
                if t.requires_grad and t.is_floating_point():
                    t.register_hook(self._grad_hook(name))
        return hook

    def _grad_hook(self, name: str) -> Callable:
        def hook(grad):
            self.calls["backward"] += 1
            if _non_finite(grad):
                self.bad_backward.setdefault(name, self.calls["backward"])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def findings(self) -> dict[str, Any]:
        """This rank's first non-finite forward output and output gradient, as sortable keys.

        Forward key (layer, order): earlier layers first, then execution order within the rank.
        Backward key (-layer, order): backward runs from the last layer down."""
        fwd = min(((layer_of(n, self.num_layers), call, display_name(n)) for n, call in self.bad_forward.items()),
                  default=None)
        bwd = min(((-layer_of(n, self.num_layers), call, display_name(n)) for n, call in self.bad_backward.items()),
                  default=None)
        return {"forward": fwd, "backward": bwd}


def non_finite_grads(model: nn.Module, num_layers: int) -> list[tuple[int, str]]:
    """(layer, name) of every parameter of this rank whose gradient holds a NaN/Inf."""
    bad = []
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else getattr(p, "main_grad", None)
        if grad is not None and not bool(torch.isfinite(grad).all()):
            bad.append((layer_of(name, num_layers), display_name(name)))
    return bad


def summarize_non_finite(per_rank: list[dict[str, Any]]) -> str:
    """One message from every rank's findings (pure): the first layer whose output, or else whose
    gradient, went non-finite, and the ranks where it did."""
    parts = []
    fwd = [(f["forward"], r) for r, f in enumerate(per_rank) if f.get("forward") is not None]
    if fwd:
        first = min(key for key, _ in fwd)
        ranks = [r for key, r in fwd if key[:1] == first[:1] and key[2] == first[2]]
        others = sorted({r for _, r in fwd} - set(ranks))
        parts.append(f"the forward output first went non-finite in {first[2]} (layer {_layer_text(first[0])}) "
                     f"on rank{'s' if len(ranks) > 1 else ''} {_ranks_text(ranks)}"
                     + (f" (then on ranks {_ranks_text(others)})" if others else ""))
    # After a non-finite forward every gradient is non-finite too: the backward says more only alone.
    bwd = [] if fwd else [(f["backward"], r) for r, f in enumerate(per_rank) if f.get("backward") is not None]
    if bwd:
        first = min(key for key, _ in bwd)
        ranks = [r for key, r in bwd if key[0] == first[0] and key[2] == first[2]]
        parts.append(f"the gradient first went non-finite in backward at {first[2]} "
                     f"(layer {_layer_text(-first[0])}) on rank{'s' if len(ranks) > 1 else ''} {_ranks_text(ranks)}")
    grads = {r: f.get("grads") or [] for r, f in enumerate(per_rank)}
    bad_ranks = [r for r, g in grads.items() if g]
    if bad_ranks and not bwd and not fwd:
        top = max(layer for g in grads.values() for layer, _ in g)
        at_top = [r for r in bad_ranks if any(layer == top for layer, _ in grads[r])]
        names = sorted({n for r in at_top for layer, n in grads[r] if layer == top})
        parts.append(f"parameter gradients are non-finite on ranks {_ranks_text(bad_ranks)}, from layer "
                     f"{_layer_text(top)} down ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''} on ranks "
                     f"{_ranks_text(at_top)})")
    if not parts:
        return "a re-run of the step found no non-finite output or gradient on any rank (a transient fault?)"
    return "; ".join(parts)


def _layer_text(layer: int) -> str:
    return "embedding" if layer < 0 else str(layer)  # num_layers and above: the final norm and head


def _ranks_text(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


@contextlib.contextmanager
def _rng_preserved(streams) -> Iterator[None]:
    """The diagnosis re-run must not move any random stream: the run continues as if it never ran."""
    torch_state = torch.get_rng_state()
    stream_state = streams.state_dict()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        streams.load_state_dict(stream_state)


def diagnose_non_finite(model: nn.Module, num_layers: int, rerun: Callable[[], Any], streams,
                        gather: Callable[[dict], list[dict]]) -> str:
    """Where a non-finite step went wrong: re-run its forward and backward (`rerun`, collective: every
    rank calls this) with NonFiniteProbe's hooks, gather every rank's findings and the parameters whose
    gradients are non-finite, and summarise. Returns the message; never raises for a failed re-run."""
    grads = non_finite_grads(model, num_layers)
    probe = NonFiniteProbe(model, num_layers)
    findings: dict[str, Any] = {"forward": None, "backward": None}
    try:
        with _rng_preserved(streams):
            rerun()
        findings = probe.findings()
    except Exception as e:  # noqa: BLE001 -- the diagnosis must not hide the non-finite step itself
        findings["error"] = f"{type(e).__name__}: {e}"
    finally:
        probe.remove()
    findings["grads"] = grads
    per_rank = gather(findings)
    errors = [f"rank {r}: {f['error']}" for r, f in enumerate(per_rank) if f.get("error")]
    message = summarize_non_finite(per_rank)
    return message + (f" (the re-run failed on {'; '.join(errors)})" if errors else "")


# ---- hung collectives --------------------------------------------------------------------------

# What gloo and the TCP transport say when a peer never answers or went away.
_TIMEOUT_PATTERNS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer")


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that timed out or lost its peer (gloo's RuntimeErrors)."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(p in text for p in _TIMEOUT_PATTERNS)


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within parallel.timeout_s: names the operation and its ranks."""

    exit_code = EXIT_COLLECTIVE_TIMEOUT


def describe_collective(last: tuple[str, str] | None, ranks_of: Callable[[str], tuple[int, ...]],
                        rank: int, timeout_s: float, cause: BaseException) -> str:
    """The message of a CollectiveTimeoutError (pure): which collective on which group of ranks."""
    if last is None:
        what = "a collective outside the counted ones (set-up, checkpoint or barrier)"
    else:
        op, group = last
        what = f"{op} on the {group} group (global ranks {_ranks_text(list(ranks_of(group)))})"
    first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    first_line = first_line.split(". This is typically caused")[0]  # gloo's generic advice adds nothing
    if "connection" in first_line.lower():
        problem = "failed: a rank of that group closed its connection (it exited or was killed)"
    else:
        problem = f"did not complete within parallel.timeout_s={timeout_s:g} s: a rank of that group is hung or dead"
    return (f"rank {rank}: {what} {problem} ({first_line}). Every rank's stack is in the log and in stacks/ of "
            f"the run directory")


class HangWatch:
    """Dumps this rank's Python stacks when any rank asks, through the job's key-value store.

    A rank whose collective timed out calls `request()`; a daemon thread on every rank (the hung one
    included: its main thread may be stuck anywhere) sees the key within `poll_s` and writes all its
    threads' stacks to stderr and to `<stack_dir>/rank<r>.txt`.
    """

    def __init__(self, store, key: str, rank: int, stack_dir: str | None, poll_s: float = 1.0):
        self.store, self.key, self.rank, self.stack_dir, self.poll_s = store, key, rank, stack_dir, poll_s
        self._stop = threading.Event()
        self.dumped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="foldtron-hang-watch", daemon=True)

    def start(self) -> HangWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def request(self, reason: str, wait_s: float = 5.0) -> None:
        """Ask every rank for its stacks and wait (up to `wait_s`) for this rank's own dump."""
        if self.dumped.is_set():  # another rank asked first: this rank's stacks are out already
            return
        with contextlib.suppress(Exception):  # a dead store must not hide the timeout itself
            self.store.set(self.key, reason)
        if not self._thread.is_alive():
            self._dump(reason)
        self.dumped.wait(wait_s)
        # The other ranks poll at the same interval: give them one more before this rank exits.
        time.sleep(min(self.poll_s * 2, wait_s))

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if not self.store.check([self.key]):
                    continue
                reason = self.store.get(self.key).decode(errors="replace")
            except Exception:  # noqa: BLE001 -- the store went away with the job: nothing to watch
                return
            self._dump(reason)
            return

    def _dump(self, reason: str) -> None:
        header = f"[rank{self.rank}] foldtron: stacks of every thread, asked for after: {reason}\n"
        with contextlib.suppress(Exception):
            sys.stderr.write(header)
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.stack_dir is not None:
            with contextlib.suppress(OSError):
                os.makedirs(self.stack_dir, exist_ok=True)
                with open(os.path.join(self.stack_dir, f"rank{self.rank:05d}.txt"), "w") as f:
                    f.write(header)
                    f.flush()
                    faulthandler.dump_traceback(file=f, all_threads=True)
        self.dumped.set()


# ---- restarts ----------------------------------------------------------------------------------


def check_restart_policy(resume: str, run_dir: str | None, environ: Mapping[str, str] | None = None) -> None:
    """Under `torchrun --max-restarts=N` (N > 0) a restart must continue the run, not start over: it
    needs a fixed trainer.run_dir and trainer.resume=auto. Raises ConfigError before anything starts."""
    env = os.environ if environ is None else environ
    max_restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if max_restarts <= 0:
        return
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    under = f"under torchrun --max-restarts={max_restarts} (this is attempt {attempt + 1})"
    if run_dir is None:
        raise ConfigError("trainer.run_dir", run_dir,
                          f"{under} each restart would start over in a new timestamped directory",
                          "set trainer.run_dir to a fixed directory and trainer.resume=auto")
    if resume != "auto":
        existing = list_checkpoints(run_dir)
        held = (f"trainer.run_dir={run_dir} holds checkpoints (newest: step {existing[-1][0]})" if existing
                else f"checkpoints saved in trainer.run_dir={run_dir} would be ignored")
        raise ConfigError("trainer.resume", resume,
                          f"{under} a restart would start over: {held}",
                          "use trainer.resume=auto so a restart continues from the newest complete checkpoint")


# ---- what the training loop holds ----------------------------------------------------------------


class FaultGuard:
    """The training loop's fault handling for one run: the stop signal and time limit (agreed over the
    world after each step), the hang watch, and the translation of a collective failure into a
    CollectiveTimeoutError that names the collective. `start()` before the loop, `close()` after."""

    def __init__(self, ps, comm_stats, run_dir: str, time_limit_min: float | None, timeout_s: float,
                 environ: Mapping[str, str] | None = None):
        self.ps, self.comm_stats, self.timeout_s = ps, comm_stats, timeout_s
        self.stop = StopSignal.from_environ(time_limit_min, environ)
        # Set once the ranks agreed to stop: the process is on its way out with status 75, and a
        # second SIGTERM (torchrun's, once a peer exited) must not turn that into a kill.
        self.stopping = False
        self.run_dir = run_dir
        self.hang_watch: HangWatch | None = None
        if ps.world_size > 1:
            import torch.distributed as dist

            from trainer.distributed import broadcast_from_writer

            # A key of this run alone: the store outlives torchrun restarts and test runs in one pool.
            key = broadcast_from_writer(f"foldtron/stack_dump/{os.getpid()}-{time.time_ns()}")
            self.hang_watch = HangWatch(dist.distributed_c10d._get_default_store(), key, ps.rank,
                                        os.path.join(run_dir, "stacks"))

    def start(self) -> None:
        """Install the signal handler and start the hang watch (call close() when training ends)."""
        self.stop.install()
        if self.hang_watch is not None:
            self.hang_watch.start()

    def close(self) -> None:
        if not self.stopping:
            self.stop.uninstall()
        if self.hang_watch is not None:
            self.hang_watch.stop()

    def agreed_stop(self) -> int:
        """The stop code every rank agrees on after a step (MAX over the world; not a step's traffic)."""
        code = self.stop.local_code()
        if self.ps.world_size == 1:
            return code
        from parallel_state.collectives import all_reduce_max

        with self.comm_stats.paused():
            return int(all_reduce_max(torch.tensor([code], dtype=torch.int64), self.ps.world).item())

    def translate(self, error: BaseException) -> BaseException | None:
        """A CollectiveTimeoutError for a collective that timed out or lost its peer (after asking
        every rank for its stacks); None for any other error."""
        if self.ps.world_size == 1 or not is_collective_failure(error):
            return None
        ps = self.ps

        def ranks_of(group: str) -> tuple[int, ...]:
            return ps.world.ranks if group == "world" else ps.axis(group).ranks

        message = describe_collective(self.comm_stats.last, ranks_of, ps.rank, self.timeout_s, error)
        log.error("%s", message)
        if self.hang_watch is not None:
            self.hang_watch.request(message)
        return CollectiveTimeoutError(message)


def restart_store_warning(environ: Mapping[str, str] | None = None) -> str | None:
    """A warning for `torchrun --max-restarts` when the agent shares its TCPStore with the workers:
    torch 2.x keeps that store across restarts without a per-attempt prefix, so a restarted rank can
    read the gloo/NCCL addresses of the dead attempt and fail to connect (seen here one restart in three)."""
    env = os.environ if environ is None else environ
    if int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) <= 0:
        return None
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return ("torchrun --max-restarts shares its store with the workers across restarts, where a restart can "
            "meet the previous attempt's keys and fail to connect; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "before torchrun (launch/slurm/train.sbatch does)")
