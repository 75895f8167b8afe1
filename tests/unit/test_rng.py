"""Named random streams in one process: reproducible, independent of each other, checkpointable."""
from __future__ import annotations

import pytest
import torch

from parallel_state.rng import STREAM_AXES, RNGStreams
from parallel_state.topology import Topology


def coords(rank: int = 0):
    return Topology(8, tp=2, pp=2, ep=2, etp=1).coords(rank)


def test_fork_draws_from_the_stream_and_restores_the_default_generator():
    torch.manual_seed(0)
    expected_after = torch.rand(4)
    streams = RNGStreams(1234, coords())
    torch.manual_seed(0)
    with streams.fork("tp-sharded"):
        inside = torch.rand(4)
    after = torch.rand(4)
    assert torch.equal(after, expected_after)  # the default sequence is untouched by the fork
    reference = torch.rand(4, generator=RNGStreams(1234, coords()).generator("tp-sharded"))
    assert torch.equal(inside, reference)


def test_streams_advance_and_are_independent():
    streams = RNGStreams(1234, coords())
    with streams.fork("tp-sharded"):
        first = torch.rand(4)
    with streams.fork("tp-replicated"):
        torch.rand(100)  # using another stream does not move this one
    with streams.fork("tp-sharded"):
        second = torch.rand(4)
    replay = RNGStreams(1234, coords()).generator("tp-sharded")
    assert torch.equal(first, torch.rand(4, generator=replay))
    assert torch.equal(second, torch.rand(4, generator=replay))
    assert not torch.equal(first, second)


def test_state_dict_resumes_the_same_numbers():
    a = RNGStreams(7, coords(3))
    with a.fork("expert"):
        torch.rand(3)
    saved = a.state_dict()
    with a.fork("expert"):
        continued = torch.rand(5)
    b = RNGStreams(7, coords(3))
    b.load_state_dict(saved)
    with b.fork("expert"):
        assert torch.equal(torch.rand(5), continued)
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({})


def test_seed_and_unknown_stream():
    a = torch.rand(8, generator=RNGStreams(1, coords()).generator("tp-replicated"))
    b = torch.rand(8, generator=RNGStreams(2, coords()).generator("tp-replicated"))
    assert not torch.equal(a, b)
    assert set(STREAM_AXES) == {"tp-replicated", "tp-sharded", "expert"}
    with pytest.raises(KeyError, match="unknown random stream"):
        RNGStreams(1, coords()).generator("dropout")
