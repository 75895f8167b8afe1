"""DeepSpeed's engine as the optimizer step (optim.backend=deepspeed; docs/deepspeed.md).

foldtron's model, data, loss contract and LR schedule stay; DeepSpeed's engine (ZeRO stage
optim.deepspeed.stage) owns the backward, the gradient reduction over the data-parallel ranks,
clipping and the AdamW update:

- the optimizer is foldtron's torch AdamW over its decay / no-decay groups (optim/param_groups.py),
  handed to DeepSpeed as the client optimizer; ZeRO shards its state (1), the gradients (2) and the
  parameters (3) over the data-parallel ranks;
- a global batch of M microbatches is one DeepSpeed step with gradient_accumulation_steps = M;
  each microbatch's loss is already divided by the global batch's loss-token count (the loss
  contract, docs/loss_and_layout.md), so DeepSpeed does not divide it again (scale_wrt_gas=False);
  DeepSpeed averages gradients over the data-parallel ranks where the contract sums them, so the
  loss is multiplied by dp (exact for powers of two);
- the learning rate of foldtron's schedule is set on the AdamW groups before each update;
- checkpoints are DeepSpeed's own format (engine.save_checkpoint / load_checkpoint), not foldtron's
  DCP checkpoints.

Only data parallelism (tp = pp = cp = ep = 1) and fp32 are supported; optim.check_backend says so
at validation.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

import torch

from optim.adamw import adamw_over
from optim.param_groups import build_param_groups
from optim.schedules import LRScheduler
from optim.step import ParamState, StepInputs


def engine_config(inputs: StepInputs, microbatches: int) -> dict:
    """The DeepSpeed JSON config of a foldtron run (pure)."""
    cfg = inputs.cfg
    stage, bucket = cfg.deepspeed.stage, int(cfg.deepspeed.bucket_size)
    zero: dict = {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                  "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": bucket, "stage3_param_persistence_threshold": 0})
    return {
        # Micro batch size only labels DeepSpeed's sample counters; the step is M microbatches.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": microbatches,
        "gradient_clipping": float(cfg.clip_grad),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "prescale_gradients": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedStep:
    """The OptimizerStep protocol (optim/step.py) over a DeepSpeed engine, plus `forward_backward`,
    which the trainer calls instead of its own loop because the engine must run the backward."""

    def __init__(self, inputs: StepInputs):
        import deepspeed  # optional dependency: validation has checked it is installed

        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it; torchrun sets it on GPUs
        self.inputs = inputs
        self.microbatches = inputs.microbatches
        self.model = inputs.modules[0]
        self.adamw = adamw_over(build_param_groups(inputs.named_params, inputs.cfg), inputs.cfg)
        self.scheduler = LRScheduler(self.adamw, inputs.cfg.lr, inputs.cfg.schedule, inputs.max_steps)
        self.dp = inputs.ps.dp_cp.size
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.adamw, config=engine_config(inputs, self.microbatches),
            dist_init_required=False)
        self.next_step = 0  # foldtron's optimizer steps done by the engine
        self.last_lr = inputs.cfg.lr
        self.last_grad_norm = 0.0

    # ---- the trainer's step ----------------------------------------------------------------------

    def forward_backward(self, loss_sum_fn: Callable[[dict], torch.Tensor], microbatches: Sequence[dict],
                         num_loss_tokens: torch.Tensor) -> torch.Tensor:
        """Every microbatch forward and backward through the engine; the detached sum of their token
        losses. The update itself happens in reduce_and_clip (the accumulation boundary)."""
        if len(microbatches) != self.microbatches:
            raise ValueError(f"{len(microbatches)} microbatches in a step; the engine was built for "
                             f"{self.microbatches} (gradient_accumulation_steps)")
        total = torch.zeros((), dtype=torch.float32)
        for i, microbatch in enumerate(microbatches):
            # What engine.forward does before calling the module (the trainer calls the model's
            # token_losses instead; the engine's own hooks on the module still run): ZeRO-3 counts
            # the micro step here, without which it overwrites the accumulated gradients.
            clear_flag = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
            if clear_flag is not None:
                clear_flag()
            loss_sum = loss_sum_fn(microbatch)
            # DeepSpeed averages gradients over the data-parallel ranks; the loss contract wants their sum.
            self.engine.backward(loss_sum * (self.dp / num_loss_tokens), scale_wrt_gas=False)
            if i < len(microbatches) - 1:
                self.engine.step()  # not a boundary: DeepSpeed only counts the micro step
            total = total + loss_sum.detach().float().cpu()
        return total

    def reduce_and_clip(self, unscale: float = 1.0) -> float:
        """The engine's boundary step: reduce, clip and update with this step's learning rate; the
        global gradient norm before clipping."""
        if unscale != 1.0:
            raise ValueError("the DeepSpeed backend runs in fp32 without a loss scale")
        self.last_lr = self.scheduler.apply(self.next_step)
        self.engine.step()
        self.next_step += 1
        norm = self.engine.get_global_grad_norm()
        self.last_grad_norm = float(norm) if norm is not None else float("nan")
        return self.last_grad_norm

    def apply(self, step: int, update: bool) -> float:
        """The update already happened in reduce_and_clip (DeepSpeed steps in one call); its lr."""
        if step != self.next_step - 1:
            raise RuntimeError(f"DeepSpeed step out of order: trainer step {step}, engine step {self.next_step - 1}")
        return self.last_lr

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # forward_backward runs the whole accumulation

    def zero_grad(self) -> None:
        """The engine zeroes its gradients after each update."""

    def finish_param_sync(self) -> None:
        """Nothing in flight outside the engine."""

    def param_states(self) -> list[ParamState]:
        raise NotImplementedError("optim.backend=deepspeed keeps DeepSpeed's own checkpoint format "
                                  "(save_checkpoint / load_checkpoint), not foldtron's per-parameter state")

    def finish_state_import(self, masters_loaded: bool) -> None:
        raise NotImplementedError("optim.backend=deepspeed resumes from DeepSpeed's own checkpoints")

    # ---- checkpoints (DeepSpeed's format) -------------------------------------------------------

    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        """engine.save_checkpoint: model, ZeRO-partitioned optimizer state and `client_state`
        (foldtron's step, RNG and data position) under directory/tag; every rank calls it."""
        self.engine.save_checkpoint(directory, tag=tag, client_state={**client_state, "next_step": self.next_step})

    def load_checkpoint(self, directory: str, resume: str) -> dict | None:
        """engine.load_checkpoint for trainer.resume: "auto" takes the newest tag of `directory` (its
        `latest` file; None when there is none), a path names directory/tag. Returns the client state
        saved with it, with "path"."""
        if resume == "auto":
            if not os.path.exists(os.path.join(directory, "latest")):
                return None
            tag = None
        else:
            directory, tag = os.path.dirname(resume.rstrip("/")), os.path.basename(resume.rstrip("/"))
        path, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"trainer.resume={resume}: no DeepSpeed checkpoint under {directory} (tag {tag})")
        self.next_step = int(client_state["next_step"])
        return {**client_state, "path": path}
