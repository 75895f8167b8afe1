"""The analytic bytes-per-parameter table (Megatron-LM's figures)."""
from __future__ import annotations

import pytest

from optim.memory import analytic_bytes_per_param


@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_analytic_table(d):
    assert analytic_bytes_per_param("fp32", False, d) == 16
    assert analytic_bytes_per_param("fp32", True, d) == 8 + 8 / d
    assert analytic_bytes_per_param("bf16", False, d) == 18
    assert analytic_bytes_per_param("bf16", True, d) == 6 + 12 / d


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="precision='fp8'"):
        analytic_bytes_per_param("fp8", False)
    with pytest.raises(ValueError, match="d=0"):
        analytic_bytes_per_param("fp32", True, 0)
