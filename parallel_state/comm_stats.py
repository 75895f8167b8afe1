"""Communication accounting: bytes each rank sends, per (collective, group), with one fixed convention.

Convention (ring algorithms, bytes SENT BY ONE RANK, n = group size, S = bytes of the FULL tensor):

    all_reduce       2 (n - 1) / n * S     S = the reduced tensor (reduce-scatter + all-gather rings)
    all_gather       (n - 1) / n * S       S = the gathered output (n shards)
    reduce_scatter   (n - 1) / n * S       S = the input before scattering (n shards)
    all_to_all       bytes of the input addressed to OTHER ranks (exact for uneven splits)
    send             bytes of a point-to-point send (pipeline activations, the CP ring)

A group of size 1 sends nothing (the collectives skip the call). These are the textbook
bandwidth terms (Megatron, NCCL tests' "bus bandwidth"), not what a tree or NVLS algorithm
actually moves; they make volumes comparable between layouts and with analytic formulas.

`CommStats` is an explicit object the caller creates and hands to collectives and layers (there
is no module-level counter); the trainer reads `summary()` once per step and calls `reset()`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# The collectives counted and what S means for each (see the module docstring).
COMM_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send")


def ring_bytes_sent(op: str, full_bytes: int, group_size: int) -> float:
    """Bytes one rank sends for `op` on a tensor of `full_bytes` (the convention above; pure)."""
    if op not in COMM_OPS:
        raise ValueError(f"unknown collective {op!r}; counted ones: {', '.join(COMM_OPS)}")
    if group_size <= 1:
        return 0.0
    n = group_size
    if op == "all_reduce":
        return 2.0 * (n - 1) / n * full_bytes
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) / n * full_bytes
    raise ValueError(f"{op} volume depends on the splits or peers, not one tensor size: count the bytes sent directly")


@dataclass
class CommStats:
    """Bytes sent and call counts per (op, group name), accumulated until `reset()`.

    Keys are (op, group) such as ("all_reduce", "tp"). Not thread-safe; one per model/trainer.
    """

    bytes_sent: dict[tuple[str, str], float] = field(default_factory=dict)  # (op, group) -> bytes
    calls: dict[tuple[str, str], int] = field(default_factory=dict)  # (op, group) -> number of calls

    paused_depth: int = 0  # > 0 inside `paused()`: calls are not counted
    # The (op, group) this rank started last, paused or not: a collective that times out is named
    # by it (trainer/faults.py).
    last: tuple[str, str] | None = None

    def record(self, op: str, group: str, nbytes: float) -> None:
        """Count one call of `op` on `group` that sent `nbytes` from this rank."""
        if op not in COMM_OPS:
            raise ValueError(f"unknown collective {op!r}; counted ones: {', '.join(COMM_OPS)}")
        self.last = (op, group)
        if self.paused_depth:
            return
        key = (op, group)
        self.bytes_sent[key] = self.bytes_sent.get(key, 0.0) + float(nbytes)
        self.calls[key] = self.calls.get(key, 0) + 1

    def total(self, op: str | None = None, group: str | None = None) -> float:
        """Bytes sent, summed over the entries matching `op` and `group` (None matches all)."""
        return sum(b for (o, g), b in self.bytes_sent.items()
                   if (op is None or o == op) and (group is None or g == group))

    def summary(self) -> dict[str, float]:
        """Flat metrics for a logger: {"comm/<group>/<op>_bytes": bytes, ..., "comm/total_bytes": sum}."""
        out = {f"comm/{g}/{o}_bytes": b for (o, g), b in sorted(self.bytes_sent.items())}
        out["comm/total_bytes"] = self.total()
        return out

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Traffic inside the block is not counted: evaluation runs between training steps, and its
        collectives must not land in the next step's per-step bytes."""
        self.paused_depth += 1
        try:
            yield
        finally:
            self.paused_depth -= 1

    def reset(self) -> None:
        """Forget everything counted so far (call once per step after logging)."""
        self.bytes_sent.clear()
        self.calls.clear()
