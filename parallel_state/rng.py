"""Named random streams: the same numbers where weights are replicated, different where sharded.

A stream's seed is a hash of (config seed, stream name, this rank's coordinates on the axes the
stream varies over). Ranks that hold the same weights for the computation a stream serves share
the stream; ranks that hold different shards get independent ones. Following Megatron-Core, the
streams do not vary over data or context parallelism (DP/CP ranks hold replicas of the same
weights; sharing a dropout pattern across different data is harmless), and they vary over the
pipeline stage, whose ranks hold different layers.

    streams = RNGStreams(cfg.seed, ps.coords)
    with streams.fork("tp-replicated"):   # e.g. dropout on activations replicated over TP
        x = F.dropout(x, p)
    with streams.fork("tp-sharded"):      # attention dropout on TP-sharded heads, SP dropout
        ...
    with streams.fork("expert"):          # inside experts sharded over EP (and ETP)
        ...
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

from parallel_state.topology import RankCoords

# Stream name -> the coordinates it varies over. Ranks equal on these coordinates share the stream.
STREAM_AXES = {
    # Computation replicated over TP (and ETP): all ranks of a pipeline stage agree.
    "tp-replicated": ("pp",),
    # Computation on a TP shard: one stream per TP rank, shared by that shard's DP/CP replicas.
    "tp-sharded": ("pp", "tp"),
    # Computation inside an expert shard: one stream per (EP, ETP) position, shared over EDP.
    "expert": ("pp", "ep", "etp"),
}


def stream_seed(seed: int, name: str, coords: RankCoords) -> int:
    """The 63-bit seed of stream `name` on the rank at `coords` (a pure function)."""
    if name not in STREAM_AXES:
        raise KeyError(f"unknown random stream {name!r}; streams are {', '.join(STREAM_AXES)}")
    key = f"foldtron-rng|{seed}|{name}|" + "|".join(f"{a}={getattr(coords, a)}" for a in STREAM_AXES[name])
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


class RNGStreams:
    """The named random streams of one rank, each an independent, advancing generator state.

    `fork(name)` swaps the stream's state into torch's default generator for `device` (so ordinary
    torch ops such as F.dropout draw from it) and saves the advanced state on exit. `generator(name)`
    gives the stream as an explicit torch.Generator instead. The states go into checkpoints through
    state_dict()/load_state_dict(), so a resumed run continues the same numbers.
    """

    def __init__(self, seed: int, coords: RankCoords, device: torch.device | str | None = None):
        self.seed = seed
        self.coords = coords
        self.device = torch.device(device if device is not None else "cpu")
        self._generators = {}
        for name in STREAM_AXES:
            g = torch.Generator(device=self.device)
            g.manual_seed(stream_seed(seed, name, coords))
            self._generators[name] = g

    def generator(self, name: str) -> torch.Generator:
        """The stream as a torch.Generator (pass it as `generator=` to torch.rand and friends)."""
        if name not in self._generators:
            raise KeyError(f"unknown random stream {name!r}; streams are {', '.join(STREAM_AXES)}")
        return self._generators[name]

    @contextlib.contextmanager
    def fork(self, name: str) -> Iterator[None]:
        """Draw torch's default random numbers for `device` from stream `name` inside the block."""
        stream = self.generator(name)
        outer = _get_default_state(self.device)
        _set_default_state(self.device, stream.get_state())
        try:
            yield
        finally:
            stream.set_state(_get_default_state(self.device))
            _set_default_state(self.device, outer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: g.get_state() for name, g in self._generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(STREAM_AXES) - set(state)
        if missing:
            raise KeyError(f"random stream states missing for {sorted(missing)}")
        for name, g in self._generators.items():
            g.set_state(state[name])


def _get_default_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_default_state(device: torch.device, state: torch.Tensor | None) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
