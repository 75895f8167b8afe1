"""Who talks to whom: the pure rank layout, its process groups and the named random streams.

This package imports no other foldtron package.
"""
from parallel_state.config import ParallelConfig
from parallel_state.groups import AxisGroup, ParallelState, init
from parallel_state.rng import STREAM_AXES, RNGStreams, stream_seed
from parallel_state.topology import (
    GROUP_NAMES,
    STANDARD_ORDERS,
    RankCoords,
    Topology,
    TopologyError,
    check_sizes,
    divisors,
    parse_order,
)

__all__ = [
    "GROUP_NAMES",
    "STANDARD_ORDERS",
    "STREAM_AXES",
    "AxisGroup",
    "ParallelConfig",
    "ParallelState",
    "RNGStreams",
    "RankCoords",
    "Topology",
    "TopologyError",
    "check_sizes",
    "divisors",
    "init",
    "parse_order",
    "stream_seed",
]
