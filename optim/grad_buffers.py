"""Bucketed data-parallel gradient reduction, overlapped with backward (DDP / Megatron style).

Every dense parameter's gradient lives in a flat contiguous buffer: `param.grad` is a view into
one of a few buckets, filled in reverse parameter order (the order backward produces gradients).
A post-accumulate-grad hook counts the parameters of a bucket that are ready; when the last one
is, the bucket's SUM all-reduce over the DP x CP group is launched asynchronously while backward
goes on with the earlier layers. `finish()` launches what is left (buckets with parameters this
step did not use) and waits for every handle.

Contracts:
- Sum, never mean: the loss contract (docs/loss_and_layout.md, "Loss normalisation") already
  divides every microbatch's loss by the global token count, so the sum over ranks is the full
  gradient.
- Gradient accumulation: communication happens in the LAST microbatch's backward only. Run the
  others under `with reducer.no_sync():` (or set `reducer.sync_enabled = False`); their
  gradients accumulate in place in the buckets.
- Buckets are launched strictly in bucket order (bucket i only after 0..i-1), so every rank issues
  the same collectives in the same order even when the set of used parameters differs per rank.
- `zero_grad()` of the reducer, not `optimizer.zero_grad(set_to_none=True)`: it zeroes the buckets
  and keeps `param.grad` a view into them. A hook that finds `param.grad` detached from its bucket
  raises with that fix.
- Main gradients: with bf16/fp16 parameters the buckets are fp32 (`grad_dtype`). Autograd still
  writes a low-precision `param.grad`; the hook adds it into the parameter's fp32 slice and drops
  it, so gradients accumulate over microbatches and reduce in fp32 (Megatron's main_grad). The
  optimizer step reads them through `main_grad(param)`.
- A parameter passed twice (tied embedding and head) is one parameter; requires_grad=False
  parameters are skipped; expert parameters (`param_meta(p).expert`) are left out: their replicas
  are the EDP group, so they get a second reducer (`experts=True`) built over `ps.edp`;
  `GradReducers` drives both.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from parallel_state.collectives import all_reduce_inplace, reduce_scatter_async
from parallel_state.groups import AxisGroup
from parallel_state.params import param_meta

BYTES_PER_MB = 1024 * 1024


def assign_buckets(numels: Sequence[int], bucket_numel: int, keys: Sequence[Any] | None = None) -> list[list[int]]:
    """Group consecutive tensors into buckets of about `bucket_numel` elements (pure).

    `numels` are given in launch order (for gradients: reverse parameter order). A bucket is closed
    as soon as it holds at least `bucket_numel` elements, so one tensor larger than that gets a
    bucket of its own; a change of `keys[i]` (e.g. dtype) also starts a new bucket. Returns the
    indices of each bucket in order; every index appears exactly once.
    """
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel={bucket_numel} must be >= 1; raise bucket_size_mb")
    if keys is not None and len(keys) != len(numels):
        raise ValueError(f"assign_buckets: {len(keys)} keys for {len(numels)} tensors")
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, numel in enumerate(numels):
        if current and keys is not None and keys[i] != keys[current[0]]:
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += int(numel)
        if filled >= bucket_numel:
            buckets.append(current)
            current, filled = [], 0
    if current:
        buckets.append(current)
    return buckets


@dataclass
class GradBucket:
    """One flat gradient buffer and the parameters whose `.grad` are views into it."""

    index: int  # launch order: 0 holds the last parameters of the model
    buffer: torch.Tensor  # flat, contiguous; element [offsets[i], offsets[i] + numel) is params[i]
    params: list[torch.nn.Parameter]
    offsets: list[int]
    ready: set[int] = field(default_factory=set)  # id() of params whose grad is final this step
    handle: Any = None  # the in-flight all-reduce, None before launch and after finish()
    launched: bool = False  # whether this step's all-reduce was issued
    # Sharded mode: the buffer is padded to a multiple of the group size and reduce-scattered; this
    # rank's reduced slice [rank * shard_numel, (rank + 1) * shard_numel) lands in `shard_grad`.
    shard_numel: int = 0
    shard_grad: torch.Tensor | None = None

    def view_of(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.buffer[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


class BucketedGradReducer:
    """Sums dense gradients over a data-parallel group in buckets launched during backward.

    `params`: the model's parameters (duplicates, frozen and expert ones are filtered out).
    `group`: the DP x CP AxisGroup (`ps.dp_cp`), or the EDP one for expert parameters.
    `bucket_size_mb`: target bucket size; smaller buckets start communicating earlier, larger ones
    cost fewer collective launches. The bytes sent go to the group's CommStats. `overlap=False` launches
    nothing from the hooks and reduces every bucket in `finish()` (the reference behaviour).

    Per step: `no_sync()` around all but the last microbatch's backward, then `finish()` before
    the gradients are read (clipping, optimizer), then `zero_grad()`.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], group: AxisGroup,
                 bucket_size_mb: float = 25.0, overlap: bool = True,
                 experts: bool = False, shard: bool = False,
                 own_bucket: Sequence[torch.nn.Parameter] = (), grad_dtype: torch.dtype | None = None):
        if bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb={bucket_size_mb} must be > 0; the DDP default is 25")
        self.group = group
        self.overlap = overlap
        # shard: reduce-scatter instead of all-reduce (the distributed optimizer); own_bucket: params
        # that get a bucket of their own, so their shard ranges match on ranks whose models differ
        # around them (a tied embedding on the first and the last pipeline stage).
        self.shard = shard
        self.sync_enabled = True  # False during non-last microbatches (see no_sync)
        self.launch_order: list[int] = []  # bucket indices in launch order, current step
        self.launched_in_backward = 0  # buckets launched by hooks (not by finish), current step
        self.last_launch_order: list[int] = []  # launch_order of the step the last finish() ended
        self.last_launched_in_backward = 0  # launched_in_backward of that step
        self._next_launch = 0  # the bucket the hooks may launch next (buckets go in order)

        unique: dict[int, torch.nn.Parameter] = {}
        for p in params:
            unique.setdefault(id(p), p)
        trainable = [p for p in unique.values() if p.requires_grad]
        # `experts` selects the expert parameters instead (their reducer runs over ps.edp).
        self.excluded = [p for p in trainable if param_meta(p).expert != experts]
        self.params = [p for p in trainable if param_meta(p).expert == experts]

        backward_order = self.params[::-1]
        # grad_dtype: the dtype gradients accumulate and reduce in; parameters of another dtype get
        # fp32 main gradients instead of .grad views (see the module docstring).
        self.main_grads = grad_dtype is not None and any(p.dtype != grad_dtype for p in self.params)
        dtype_of = (lambda p: grad_dtype) if grad_dtype is not None else (lambda p: p.dtype)
        element_bytes = max((dtype_of(p).itemsize for p in backward_order), default=4)
        bucket_numel = max(1, int(bucket_size_mb * BYTES_PER_MB) // element_bytes)
        own = {id(p) for p in own_bucket}
        groups = assign_buckets([p.numel() for p in backward_order], bucket_numel,
                                keys=[(dtype_of(p), p.device, id(p) in own) for p in backward_order])
        self.buckets: list[GradBucket] = []
        self._slot_of: dict[int, tuple[GradBucket, int]] = {}  # id(param) -> (bucket, index in it)
        for index, members in enumerate(groups):
            bucket_params = [backward_order[i] for i in members]
            offsets, total = [], 0
            for p in bucket_params:
                offsets.append(total)
                total += p.numel()
            first = bucket_params[0]
            shard_numel = -(-total // group.size) if shard else 0
            padded = shard_numel * group.size if shard else total
            buffer = torch.zeros(padded, dtype=dtype_of(first), device=first.device)
            bucket = GradBucket(index, buffer, bucket_params, offsets, shard_numel=shard_numel)
            self.buckets.append(bucket)
            for i, p in enumerate(bucket_params):
                self._slot_of[id(p)] = (bucket, i)
        self._attach_views()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self.params]

    # ---- per-step API ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside this context only accumulates (a non-last microbatch)."""
        previous = self.sync_enabled
        self.sync_enabled = False
        try:
            yield
        finally:
            self.sync_enabled = previous

    def finish(self) -> None:
        """Launch every bucket not launched yet (in order), wait for all; grads are then reduced."""
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            bucket.handle = None
            bucket.launched = False
            bucket.ready.clear()
        self.last_launch_order, self.launch_order = self.launch_order, []
        self.last_launched_in_backward, self.launched_in_backward = self.launched_in_backward, 0
        self._next_launch = 0

    def zero_grad(self) -> None:
        """Zero every bucket and make each `param.grad` a view into its bucket again."""
        for bucket in self.buckets:
            if bucket.handle is not None:
                raise RuntimeError("zero_grad() with an all-reduce in flight; call finish() first")
            bucket.buffer.zero_()
        self._attach_views()

    def remove_hooks(self) -> None:
        """Detach from the parameters (the buckets stay as they are)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def num_buckets(self) -> int:
        return len(self.buckets)

    # ---- internals ------------------------------------------------------------------------------

    def main_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The slice of the buckets that holds `param`'s gradient (its .grad in the fp32 case)."""
        bucket, i = self._slot_of[id(param)]
        return bucket.view_of(i)

    def _attach_views(self) -> None:
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                p.grad = None if self.main_grads else bucket.view_of(i)

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        bucket, i = self._slot_of[id(param)]
        view = bucket.view_of(i)
        if self.main_grads:
            view.add_(param.grad)
            param.grad = None
        elif param.grad is None or (view.numel() and param.grad.data_ptr() != view.data_ptr()):
            raise RuntimeError(
                "BucketedGradReducer: a parameter's .grad is no longer a view into its bucket (was "
                "it set to None, e.g. optimizer.zero_grad(set_to_none=True)?); call "
                "reducer.zero_grad() instead between steps")
        if not self.sync_enabled or not self.overlap:
            return
        if bucket.launched:
            raise RuntimeError(
                f"BucketedGradReducer: a gradient arrived for bucket {bucket.index} after its "
                "all-reduce was launched (a parameter used in two backward passes of one synced "
                "microbatch, or reentrant checkpointing); run earlier passes under no_sync()")
        bucket.ready.add(id(param))
        # Launch strictly in bucket order, so every rank issues the same sequence of collectives.
        while (self._next_launch < len(self.buckets)
               and len(self.buckets[self._next_launch].ready) == len(self.buckets[self._next_launch].params)):
            self._launch(self.buckets[self._next_launch])
            self.launched_in_backward += 1

    def _launch(self, bucket: GradBucket) -> None:
        if self.shard:
            bucket.shard_grad, bucket.handle = reduce_scatter_async(bucket.buffer, self.group)
        else:
            bucket.handle = all_reduce_inplace(bucket.buffer, self.group, async_op=True)
        bucket.launched = True
        self.launch_order.append(bucket.index)
        self._next_launch = max(self._next_launch, bucket.index + 1)


class GradReducers:
    """The dense reducer (over DP x CP) and, for MoE models, the expert reducer (over EDP), driven
    together: one `no_sync()`, `finish()` and `zero_grad()` for the trainer."""

    def __init__(self, reducers: Sequence[BucketedGradReducer]):
        self.reducers = [r for r in reducers if r.params]

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for reducer in self.reducers:
                stack.enter_context(reducer.no_sync())
            yield

    def finish(self) -> None:
        for reducer in self.reducers:
            reducer.finish()

    def zero_grad(self) -> None:
        for reducer in self.reducers:
            reducer.zero_grad()

    def main_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        """`param`'s slice of the gradient buckets, from the reducer that holds it."""
        for reducer in self.reducers:
            if id(param) in reducer._slot_of:
                return reducer.main_grad(param)
        raise KeyError("main_grad: the parameter is in no reducer (frozen, or not passed to the step)")
