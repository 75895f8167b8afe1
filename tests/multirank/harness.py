"""Run test functions on N real gloo ranks from pytest, paying for process start-up once.

Starting ranks and importing torch costs seconds per process on a small CPU machine, so a
`RankPool` starts its workers once (a forkserver that has already imported torch forks them) and
then runs many calls in them: `pool.run(fn, *args)` sends a picklable callable (a module-level
function) to every rank, runs it as `fn(*args)` with the default gloo group up, and returns the
per-rank results as a list indexed by rank.

Failures come back as failures, never as hangs:
- an exception on a rank is re-raised in the test (the original type when it pickles) with a note
  naming the rank and the remote traceback as its cause;
- a call that does not finish within its timeout dumps the Python stack of every rank
  (faulthandler on SIGUSR1, which works while a rank is blocked inside a gloo collective), kills
  the workers and raises RankTimeoutError carrying those stacks. The pool is then closed; the
  `rank_pools` fixture starts a fresh one for the next test.

`fake_world(rank, world_size)` is the single-process counterpart for large worlds: this process
plays one rank of the `fake` backend, whose collectives do nothing, which is enough to check group
membership of a 1024-rank layout.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0  # per call; a hung collective fails the test after this long
START_TIMEOUT_S = 120.0  # workers importing torch and joining gloo on a loaded 2-core machine
ERROR_GRACE_S = 1.5  # after one rank fails, how long the others get to finish or fail too
STACK_DUMP_WAIT_S = 2.0  # how long the stack files get to be written after SIGUSR1
# Imported once by the forkserver the workers are forked from (only the first pool of a process
# starts it). Test modules themselves are imported by each worker on its first call.
FORKSERVER_PRELOAD = ("torch", "torch.distributed", "pytest", "parallel_state", "models", "trainer.trainer", __name__)


class RankTimeoutError(TimeoutError):
    """A call that did not finish on every rank in time; `stacks` maps rank -> its Python stack."""

    def __init__(self, message: str, stacks: dict[int, str]):
        super().__init__(message)
        self.stacks = stacks


class RankError(RuntimeError):
    """An exception raised on a rank that could not be sent back as itself (it did not pickle)."""


class _RemoteTraceback(Exception):
    """The formatted traceback of a rank, attached as the __cause__ of the re-raised exception."""

    def __str__(self) -> str:
        return self.args[0]


def _worker_main(rank: int, world_size: int, store_port: int, conn, stack_path: str,
                 timeout_s: float) -> None:
    """One rank: join the gloo world, then run calls until told to stop."""
    stack_file = open(stack_path, "w")  # noqa: SIM115 -- open for the worker's life: faulthandler writes to it
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    # Many ranks share few cores; more intra-op threads per rank only add contention.
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _send(conn, ("ready", rank))
    while True:
        payload = conn.recv_bytes()
        fn = "the task"
        try:
            task = pickle.loads(payload)  # imports the module of fn on its first use in this worker
            if task is None:
                break
            fn, args, kwargs = task
            result = ("ok", fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 -- every failure goes back to the test
            result = ("error", _picklable(e), traceback.format_exc())
        try:
            _send(conn, result)
        except Exception as e:  # noqa: BLE001 -- the result did not pickle, whatever the reason
            _send(conn, ("error", RankError(f"could not send the result of {fn!r} back: {e!r}"),
                       traceback.format_exc()))
    dist.destroy_process_group()
    conn.close()


def _send(conn, obj: Any) -> None:
    # Plain pickle copies tensors by value. Connection.send would use torch's shared-memory
    # reductions, whose file descriptors outlive neither a killed worker nor a closed pool.
    conn.send_bytes(pickle.dumps(obj))


def _recv(conn) -> Any:
    return pickle.loads(conn.recv_bytes())


def _picklable(exc: BaseException) -> BaseException:
    """`exc` itself if it survives a pickle round trip, else a RankError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 -- any failure to pickle means: send a description instead
        return RankError(f"{type(exc).__name__}: {exc}")


class RankPool:
    """`world_size` gloo ranks in worker processes, started once and reused for many calls."""

    def __init__(self, world_size: int, timeout_s: float = DEFAULT_TIMEOUT_S, start_method: str = "forkserver"):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.closed = False
        start = time.perf_counter()
        self._stack_dir = tempfile.mkdtemp(prefix=f"rankpool{world_size}-")
        # The parent owns the rendezvous store on a port the OS picks: no free-port race.
        self._store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
        # "forkserver": a server process imports FORKSERVER_PRELOAD once and every worker is a fork of
        # it, instead of each worker importing torch (seconds) and, on its first call, pytest and the
        # code under test. "spawn" (fresh interpreters) is there for comparison and debugging.
        ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
        self._conns, self._procs = [], []
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, daemon=True, name=f"rank{rank}",
                               args=(rank, world_size, self._store.port, child_conn,
                                     self._stack_path(rank), timeout_s))
            proc.start()
            child_conn.close()
            self._conns.append(parent_conn)
            self._procs.append(proc)
        self._collect(START_TIMEOUT_S, what="start-up")
        self.start_s = time.perf_counter() - start

    def _stack_path(self, rank: int) -> str:
        return os.path.join(self._stack_dir, f"rank{rank}.stack")

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list:
        """Run `fn(*args, **kwargs)` on every rank; return the results indexed by rank."""
        if self.closed:
            raise RuntimeError("this RankPool was closed (after a timeout or by close()); start a new one")
        for conn in self._conns:
            _send(conn, (fn, args, kwargs))
        return self._collect(self.timeout_s if timeout_s is None else timeout_s,
                             what=getattr(fn, "__qualname__", repr(fn)))

    def _collect(self, timeout_s: float, what: str) -> list:
        """Wait for one message per rank; raise the first rank's exception or a timeout with stacks."""
        deadline = time.monotonic() + timeout_s
        results: dict[int, Any] = {}
        errors: dict[int, tuple] = {}
        pending = {conn: rank for rank, conn in enumerate(self._conns)}
        while pending:
            ready = multiprocessing.connection.wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for conn in ready:
                rank = pending.pop(conn)
                try:
                    msg = _recv(conn)
                except EOFError:
                    self._procs[rank].join(timeout=1)
                    msg = ("error", RankError(f"rank {rank} exited (exit code "
                                              f"{self._procs[rank].exitcode}) during {what}"), "")
                except Exception as e:  # noqa: BLE001 -- a message that does not unpickle here
                    msg = ("error", RankError(f"rank {rank}: its answer could not be unpickled: {e!r}"), "")
                if msg[0] == "error":
                    if not errors:  # the others may be blocked in a collective with the failed rank
                        deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
                    errors[rank] = msg
                else:
                    results[rank] = msg
        stuck = sorted(pending.values())
        stacks = self._dump_stacks(stuck) if stuck else {}
        if stuck:
            self.close(force=True)
        if errors:
            self._raise_rank_error(errors, stuck, stacks, what)
        if stuck:
            shown = "\n".join(f"--- rank {r} ---\n{stacks[r]}" for r in stuck)
            raise RankTimeoutError(f"{what}: ranks {stuck} of {self.world_size} did not finish within "
                                   f"{timeout_s:.0f} s; their stacks:\n{shown}", stacks)
        return [results[r][1] for r in range(self.world_size)]

    def _raise_rank_error(self, errors: dict[int, tuple], stuck: list[int], stacks: dict[int, str],
                          what: str) -> None:
        first = min(errors)
        _, exc, remote_tb = errors[first]
        if not isinstance(exc, BaseException):
            exc = RankError(repr(exc))
        notes = [f"raised on rank {first} of {self.world_size} in {what}"]
        notes += [f"rank {r} also raised {type(errors[r][1]).__name__}: {errors[r][1]}"
                  for r in sorted(errors) if r != first]
        if stuck:
            notes.append(f"ranks {stuck} were still running (the pool was closed); their stacks:\n" +
                         "\n".join(f"--- rank {r} ---\n{stacks[r]}" for r in stuck))
        # What BaseException.add_note does on Python 3.11+ (printed under the message by tracebacks).
        exc.__notes__ = list(getattr(exc, "__notes__", [])) + notes
        raise exc from _RemoteTraceback(f"\n--- traceback on rank {first} ---\n{remote_tb}")

    def _dump_stacks(self, ranks: list[int]) -> dict[int, str]:
        for r in ranks:
            if self._procs[r].is_alive():
                os.kill(self._procs[r].pid, signal.SIGUSR1)
        stacks: dict[int, str] = {}
        deadline = time.monotonic() + STACK_DUMP_WAIT_S
        for r in ranks:
            text, previous = "", None
            # faulthandler writes from a signal handler; the dump is complete once the file stops growing.
            while time.monotonic() < deadline and self._procs[r].is_alive():
                with open(self._stack_path(r)) as f:
                    text = f.read()
                if text and text == previous:
                    break
                previous = text
                time.sleep(0.1)
            # The frames below the worker loop (multiprocessing's bootstrap) say nothing about the hang.
            text = "\n".join(line for line in text.splitlines()
                              if "/multiprocessing/" not in line and 'File "<string>"' not in line)
            stacks[r] = text or f"(no stack: the process {'exited' if not self._procs[r].is_alive() else 'did not answer'})"
        return stacks

    def close(self, force: bool = False) -> None:
        """Stop the workers (politely unless `force`, which kills them) and release the store."""
        if self.closed:
            return
        self.closed = True
        if not force:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    _send(conn, None)
            for proc in self._procs:
                proc.join(timeout=10)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
        del self._store
        shutil.rmtree(self._stack_dir, ignore_errors=True)


class RankPools:
    """One live RankPool per world size, started on first use and replaced after a failure."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._pools: dict[int, RankPool] = {}

    def get(self, world_size: int) -> RankPool:
        pool = self._pools.get(world_size)
        if pool is None or pool.closed:
            pool = self._pools[world_size] = RankPool(world_size, timeout_s=self.timeout_s)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """Make this process rank `rank` of a `world_size`-rank job on the `fake` backend.

    Collectives return immediately without data, so only membership, ranks and sizes are
    meaningful. The default group is destroyed on exit.
    """
    # Importing this private module registers the backend (torch 2.13 has no public registration).
    import torch.testing._internal.distributed.fake_pg  # noqa: F401

    if dist.is_initialized():
        raise RuntimeError("fake_world: torch.distributed is already initialized in this process")
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
