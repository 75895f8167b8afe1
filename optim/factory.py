"""The optimizer step a config asks for."""
from __future__ import annotations

import dataclasses

from optim.distributed import DistributedOptimizerStep
from optim.outer.step import OuterOptimizerStep
from optim.sgd import SGDStep
from optim.step import BucketedOptimizerStep, OptimizerStep, StepInputs


def build_optimizer_step(inputs: StepInputs) -> OptimizerStep:
    """The distributed optimizer with optim.distributed=true, else the bucketed all-reduce step (SGD
    with optim.name=sgd); with an outer optimizer (optim.outer), that step over one worker's ranks
    inside the outer rounds over workers."""
    if inputs.cfg.backend == "deepspeed":  # DeepSpeed's engine owns the step (docs/deepspeed.md)
        from optim.deepspeed_engine import DeepSpeedStep  # imports deepspeed: only when asked for
        return DeepSpeedStep(inputs)
    if inputs.cfg.outer != "none":
        inner = build_inner_step(dataclasses.replace(inputs, ps=inputs.ps.within_worker()))
        return OuterOptimizerStep(inner, inputs)
    return build_inner_step(inputs)


def build_inner_step(inputs: StepInputs) -> OptimizerStep:
    """The step of one worker (the whole job without an outer optimizer)."""
    if inputs.cfg.name == "sgd":
        return SGDStep(inputs)
    return (DistributedOptimizerStep if inputs.cfg.distributed else BucketedOptimizerStep)(inputs)
