"""Who talks to whom: the pure rank layout, its process groups and the named random streams.

This package imports no other foldtron package.
"""
from parallel_state.check import check
from parallel_state.config import CP_COMMS, ParallelConfig
from parallel_state.errors import ConfigError, require, require_choice, require_positive
from parallel_state.groups import AxisGroup, ParallelState, init
from parallel_state.rng import STREAM_AXES, RNGStreams, stream_seed
from parallel_state.topology import (
    GROUP_NAMES,
    STANDARD_ORDERS,
    RankCoords,
    Topology,
    check_sizes,
    divisors,
    parse_order,
)

__all__ = [
    "CP_COMMS",
    "GROUP_NAMES",
    "STANDARD_ORDERS",
    "STREAM_AXES",
    "AxisGroup",
    "ConfigError",
    "ParallelConfig",
    "ParallelState",
    "RNGStreams",
    "RankCoords",
    "Topology",
    "check",
    "check_sizes",
    "divisors",
    "init",
    "parse_order",
    "require",
    "require_choice",
    "require_positive",
    "stream_seed",
]
