"""The optimizer step a config asks for."""
from __future__ import annotations

from optim.distributed import DistributedOptimizerStep
from optim.step import BucketedOptimizerStep, OptimizerStep, StepInputs


def build_optimizer_step(inputs: StepInputs) -> OptimizerStep:
    """The distributed optimizer with optim.distributed=true, else the bucketed all-reduce step."""
    return (DistributedOptimizerStep if inputs.cfg.distributed else BucketedOptimizerStep)(inputs)
