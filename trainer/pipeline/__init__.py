"""Pipeline parallelism (docs/pipeline.md): pure orders, a pure simulator, the p2p executor and this
rank's stage model.

- `orders.py`: 1F1B and interleaved 1F1B orders, their rules, virtual stages and the layer split
  (pure: no processes, no tensors);
- `simulator.py`: discrete-event simulation of orders (deadlock, bubble, activation memory; pure);
- `executor.py`: runs the microbatches of a step, without pipelining or one rank's order with p2p;
- `stage_model.py`: this rank's model chunks (one `DecoderModel` per virtual stage).
"""

from trainer.pipeline.executor import (
    PipelineTiming,
    forward_backward_no_pipelining,
    forward_backward_pipelining,
)
from trainer.pipeline.orders import (
    BACKWARD,
    FORWARD,
    Action,
    check_interleaved,
    interleaved_1f1b_order,
    one_f_one_b_order,
    pipeline_orders,
    split_layers,
    to_torch_actions,
    virtual_stage,
)
from trainer.pipeline.simulator import (
    PipelineDeadlock,
    SimResult,
    max_in_flight,
    measured_cost,
    simulate,
    uniform_cost,
)
from trainer.pipeline.stage_model import PipelineChunks

__all__ = [
    "BACKWARD",
    "FORWARD",
    "Action",
    "PipelineChunks",
    "PipelineDeadlock",
    "PipelineTiming",
    "SimResult",
    "check_interleaved",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining",
    "interleaved_1f1b_order",
    "max_in_flight",
    "measured_cost",
    "one_f_one_b_order",
    "pipeline_orders",
    "simulate",
    "split_layers",
    "to_torch_actions",
    "uniform_cost",
    "virtual_stage",
]
