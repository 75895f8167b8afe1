"""The `parallel.*` rules: the sizes tile the world on both grids, and the options fit together."""
from __future__ import annotations

from parallel_state.config import CP_COMMS, ParallelConfig
from parallel_state.errors import require, require_choice, require_positive
from parallel_state.topology import Topology


def check(cfg: ParallelConfig, world_size: int) -> Topology:
    """Raise ConfigError on the first bad `parallel.*` value; return the layout's Topology."""
    require_positive("parallel.vpp", cfg.vpp)
    require_choice("parallel.cp_comm", cfg.cp_comm, CP_COMMS)
    require_positive("parallel.timeout_s", cfg.timeout_s)
    require_positive("parallel.dp_bucket_mb", cfg.dp_bucket_mb)
    topology = Topology.from_config(cfg, world_size)  # sizes tile the world on both grids; a valid order
    require(cfg.vpp == 1 or cfg.pp > 1, "parallel.vpp", cfg.vpp, "virtual stages need pipeline parallelism",
            "set parallel.vpp=1 or parallel.pp>1")
    require(not cfg.sequence_parallel or cfg.tp > 1, "parallel.sequence_parallel", cfg.sequence_parallel,
            "sequence parallelism shards over tensor-parallel ranks", "set parallel.tp>1 or turn it off")
    return topology
