"""What every rank measured over a logging window, gathered in one small collective, and its summary.

Each rank packs a fixed-length float64 vector (step time, busy time, data-loading time, peak
memory, pipeline idle fraction, then its bytes sent per (collective, group) in a fixed key order);
one all-gather over the world brings every rank's vector to every rank. The summary (pure) gives
the cross-rank metrics the trainer logs and names the stragglers.

In synchronous training every rank's step takes as long as the slowest rank's: the others wait in
the collectives. So stragglers are found by busy time (the step minus the time spent waiting for
other ranks), which is high on the rank the others wait for.

Keys it adds to the metrics (docs/observability.md):

    perf/step_time_max_s, perf/step_time_min_s, perf/step_time_mean_s
    perf/busy_time_max_s, perf/busy_time_median_s, perf/slowest_rank (the largest busy time)
    perf/data_time_max_s, perf/data_time_mean_s, perf/pipeline_idle_fraction (pipelined runs)
    perf/stragglers                    ranks busy longer than the median by trainer.straggler_factor
    mem/peak_bytes_max, mem/peak_bytes_min
    comm/<group>/<op>_bytes_all_ranks  bytes per step summed over every rank; comm/total_bytes_all_ranks
    ranks/step_time_s, ranks/busy_time_s, ranks/data_time_s, ranks/peak_mem_bytes, ranks/pipeline_idle
                                       one value per rank
"""
from __future__ import annotations

import math
import resource
import statistics
import sys
from dataclasses import dataclass, field

import torch

from parallel_state.collectives import all_gather_async
from parallel_state.comm_stats import COMM_OPS
from parallel_state.groups import AxisGroup
from parallel_state.topology import GROUP_NAMES

# Every (op, group) a rank may count, in one fixed order, so the vectors line up across ranks.
COMM_KEYS: tuple[tuple[str, str], ...] = tuple((op, group) for group in (*GROUP_NAMES, "world") for op in COMM_OPS)
_SCALARS = ("step_time_s", "busy_time_s", "data_time_s", "peak_mem_bytes", "pipeline_idle")


@dataclass
class RankSample:
    """One rank's figures for a logging window (times are per step; nan where not measured)."""

    step_time_s: float
    busy_time_s: float  # the step without the time spent waiting for other ranks
    data_time_s: float
    peak_mem_bytes: float
    pipeline_idle: float = math.nan
    comm: dict[tuple[str, str], float] = field(default_factory=dict)  # (op, group) -> bytes per step

    def pack(self) -> torch.Tensor:
        values = [getattr(self, name) for name in _SCALARS] + [self.comm.get(key, 0.0) for key in COMM_KEYS]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def unpack(cls, vector: torch.Tensor) -> RankSample:
        values = vector.tolist()
        scalars = dict(zip(_SCALARS, values))
        comm = {key: v for key, v in zip(COMM_KEYS, values[len(_SCALARS):]) if v}
        return cls(**scalars, comm=comm)


def gather_samples(sample: RankSample, world: AxisGroup) -> list[RankSample]:
    """Every rank's sample, in rank order (one all-gather of len(COMM_KEYS) + 5 doubles per rank)."""
    vector = sample.pack()
    gathered, handle = all_gather_async(vector.unsqueeze(0), world)
    handle.wait()
    return [RankSample.unpack(row) for row in gathered]


def peak_memory_bytes(device: torch.device) -> float:
    """The CUDA allocator's peak on GPU; on CPU the process' resident-set high-water mark."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def find_stragglers(busy_times: list[float], factor: float) -> list[int]:
    """Ranks whose busy time exceeds the median by more than `factor` (none on one rank)."""
    if len(busy_times) < 2:
        return []
    median = statistics.median(busy_times)
    return [rank for rank, t in enumerate(busy_times) if t > factor * median]


def summarize(samples: list[RankSample], straggler_factor: float) -> tuple[dict, list[int]]:
    """The cross-rank metrics (module docstring) and the stragglers' ranks."""
    times = [s.step_time_s for s in samples]
    busy = [s.busy_time_s for s in samples]
    data = [s.data_time_s for s in samples]
    mem = [s.peak_mem_bytes for s in samples]
    idle = [s.pipeline_idle for s in samples]
    stragglers = find_stragglers(busy, straggler_factor)
    metrics: dict = {
        "perf/step_time_max_s": max(times), "perf/step_time_min_s": min(times),
        "perf/step_time_mean_s": sum(times) / len(times), "perf/busy_time_max_s": max(busy),
        "perf/busy_time_median_s": statistics.median(busy), "perf/slowest_rank": float(busy.index(max(busy))),
        "perf/data_time_max_s": max(data), "perf/data_time_mean_s": sum(data) / len(data),
        "perf/stragglers": float(len(stragglers)),
        "mem/peak_bytes_max": max(mem), "mem/peak_bytes_min": min(mem),
        "ranks/step_time_s": times, "ranks/busy_time_s": busy, "ranks/data_time_s": data,
        "ranks/peak_mem_bytes": mem,
    }
    if not any(math.isnan(v) for v in idle):
        metrics["perf/pipeline_idle_fraction"] = sum(idle) / len(idle)
        metrics["ranks/pipeline_idle"] = idle
    totals: dict[tuple[str, str], float] = {}
    for s in samples:
        for key, value in s.comm.items():
            totals[key] = totals.get(key, 0.0) + value
    metrics.update({f"comm/{group}/{op}_bytes_all_ranks": v for (op, group), v in sorted(totals.items(),
                                                                                            key=lambda kv: kv[0][::-1])})
    metrics["comm/total_bytes_all_ranks"] = sum(totals.values())
    return metrics, stragglers


def straggler_lines(samples: list[RankSample], stragglers: list[int], factor: float) -> list[str]:
    """One console line per straggler: its busy time against the median, its step and data-loading time."""
    median = statistics.median(s.busy_time_s for s in samples)
    return [f"straggler: rank {r} busy {samples[r].busy_time_s:.3f} s/step, {samples[r].busy_time_s / median:.2f}x "
            f"the median rank's {median:.3f} s (trainer.straggler_factor={factor}); step "
            f"{samples[r].step_time_s:.3f} s, data loading {samples[r].data_time_s:.3f} s/step" for r in stragglers]
