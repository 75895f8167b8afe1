"""Run the microbatches of one global batch: on one stage, or one pipeline rank's order with p2p.

The loss contract (docs/loss_and_layout.md, "Loss normalisation"): each microbatch backpropagates
its *sum* of token losses divided by the number of loss tokens in the whole global batch (all
microbatches, all DP and CP ranks), so the accumulated gradient is the same for every microbatch
split and layout.

`forward_backward_no_pipelining` runs the microbatches on one stage. `forward_backward_pipelining`
executes the actions of this pp rank's order (trainer/pipeline/orders.py) in sequence:

    F(c, m)  stage s = c*P + r. Input: microbatch m's dict on virtual stage 0, else the activation
             received from stage s-1 (pp rank (s-1) % P). Runs chunks[c]. On the last virtual stage
             the output goes to loss_sum_fn(output, microbatch); elsewhere it is sent to stage s+1.
    B(c, m)  On the last stage: backward of loss_sum / num_loss_tokens (the loss contract,
             docs/loss_and_layout.md "Loss normalisation").
             Elsewhere: receive d(output) from stage s+1 and backpropagate it through the chunk.
             Then send d(input) to stage s-1 (unless s == 0).

Communication (parallel_state/p2p.py): sends never block (isend; waited for at the end, or
reaped once complete), receives block until the data is there. Receives from a peer are posted in
the order the peer sends (derived from the peer's order, which every rank can compute), so the
k-th send meets the k-th receive with no tags, as NCCL requires. The receive of the next action's
input is posted in the same batch as the current action's send, overlapping it with compute.
Stage-to-stage messages inside one rank (P = 1) are handed over locally, without p2p.

Memory: once an output is sent, its storage is released and only its autograd graph is kept
(Megatron's deallocate_output_tensor): the send gets a detached alias that keeps the storage alive
until the send completes, and `output.data` is swapped for a one-element tensor. For the backward,
`output.data` is pointed at the received gradient, which has the output's shape, so that the
public torch.autograd.backward(output, grad) passes its shape check; the backward reads no data
of the output itself (a grad_fn that needs its result, e.g. tanh, saved its own reference when it
ran, so in that case the storage stays alive and nothing is freed, but the result is still right).
Outputs that are views or non-contiguous are sent as a contiguous copy and not deallocated.

Every backward except this rank's last runs under `no_sync()`, as in forward_backward_no_pipelining.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from parallel_state.groups import AxisGroup
from parallel_state.p2p import batch_send_recv
from trainer.pipeline.orders import BACKWARD, FORWARD, Action

Message = tuple[str, int, int]  # (kind "F" activation | "B" gradient, destination virtual stage, microbatch)
LossSumFn = Callable[[dict], torch.Tensor]


def forward_backward_no_pipelining(loss_sum_fn: LossSumFn, microbatches: Sequence[dict],
                                   num_loss_tokens: torch.Tensor | float, forward_only: bool = False,
                                   no_sync: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """Run every microbatch forward (and backward); return the detached sum of their token losses.

    `loss_sum_fn(microbatch)` returns the microbatch's sum of masked token losses (a scalar).
    Every backward but the last runs under `no_sync()`, so the gradient reduction (launched from
    backward hooks) communicates once per step, overlapped with the last microbatch's backward.
    """
    total = torch.zeros((), dtype=torch.float32)
    for i, microbatch in enumerate(microbatches):
        if forward_only:
            with torch.no_grad():
                loss_sum = loss_sum_fn(microbatch)
        else:
            with no_sync() if i < len(microbatches) - 1 else nullcontext():
                loss_sum = loss_sum_fn(microbatch)
                (loss_sum / num_loss_tokens).backward()
        total = total.to(loss_sum.device) + loss_sum.detach().float()
    return total


@dataclass
class PipelineTiming:
    """Filled in by the executor when passed: seconds blocked waiting for receives, and in total."""

    wait_s: float = 0.0
    total_s: float = 0.0

    @property
    def idle_fraction(self) -> float:
        return self.wait_s / self.total_s if self.total_s else 0.0


def outgoing_messages(order: Sequence[Action], pp_rank: int, pp_size: int, vpp_size: int) -> list[tuple[Message, int]]:
    """The messages rank `pp_rank` sends while running `order`, in order, each with its destination pp rank."""
    last = pp_size * vpp_size - 1
    out = []
    for kind, chunk, mb in order:
        s = chunk * pp_size + pp_rank
        if kind == FORWARD and s < last:
            out.append(((FORWARD, s + 1, mb), (s + 1) % pp_size))
        elif kind == BACKWARD and s > 0:
            out.append(((BACKWARD, s - 1, mb), (s - 1) % pp_size))
    return out


class _Inbox:
    """Receives from each peer, posted in the peer's send order; local hand-over for P = 1."""

    def __init__(self, orders: Sequence[Sequence[Action]], pp: AxisGroup, vpp_size: int,
                 shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        me, P = pp.rank, pp.size
        self.pp, self.shape, self.dtype, self.device = pp, shape, dtype, device
        self.expected: dict[int, list[Message]] = {}  # peer -> the messages it sends me, in its order
        self.source: dict[Message, tuple[int, int]] = {}  # message -> (peer, index in expected[peer])
        for q in range(P):
            if q == me:
                continue
            msgs = [msg for msg, dst in outgoing_messages(orders[q], q, P, vpp_size) if dst == me]
            self.expected[q] = msgs
            self.source.update({msg: (q, i) for i, msg in enumerate(msgs)})
        self.posted = dict.fromkeys(self.expected, 0)  # peer -> how many receives are posted
        self.pending: dict[Message, tuple[torch.Tensor, Any]] = {}  # posted, not yet taken
        self.local: dict[Message, torch.Tensor] = {}

    def recvs_up_to(self, msg: Message) -> list[tuple[torch.Tensor, int, Message]]:
        """Buffers to post (in the peer's order) so that `msg` is posted; none if it already is."""
        if msg not in self.source:
            return []
        peer, index = self.source[msg]
        new = []
        for i in range(self.posted[peer], index + 1):
            buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            new.append((buffer, peer, self.expected[peer][i]))
        self.posted[peer] = max(self.posted[peer], index + 1)
        return new

    def register(self, posted: list[tuple[torch.Tensor, int, Message]], works: list) -> None:
        for (buffer, _, msg), work in zip(posted, works, strict=True):
            self.pending[msg] = (buffer, work)

    def take(self, msg: Message, timing: PipelineTiming | None) -> torch.Tensor:
        """The tensor of `msg`, waiting for it if it is still in flight."""
        if msg in self.local:
            return self.local.pop(msg)
        if msg not in self.pending:
            if msg not in self.source:
                raise RuntimeError(f"pipeline executor: no rank's order sends {msg} to pp rank {self.pp.rank}")
            posted = self.recvs_up_to(msg)
            self.register(posted, batch_send_recv(self.pp, recvs=[(b, p) for b, p, _ in posted]))
        buffer, work = self.pending.pop(msg)
        t0 = time.perf_counter()
        work.wait()
        if timing is not None:
            timing.wait_s += time.perf_counter() - t0
        return buffer


def forward_backward_pipelining(orders: Sequence[Sequence[Action]],
                                chunks: Sequence[Callable[[Any], torch.Tensor]],
                                microbatches: Sequence[Any],
                                loss_sum_fn: Callable[[torch.Tensor, Any], torch.Tensor],
                                num_loss_tokens: torch.Tensor | float,
                                pp: AxisGroup, vpp_size: int,
                                activation_shape: Sequence[int], dtype: torch.dtype,
                                device: torch.device | str,
                                forward_only: bool = False,
                                no_sync: Callable[[], AbstractContextManager] = nullcontext,
                                timing: PipelineTiming | None = None) -> torch.Tensor:
    """Run this pp rank's order `orders[pp.rank]`; return the detached sum of its token losses.

    - `orders`: every pp rank's order (trainer.pipeline.orders.pipeline_orders); the others' tell this
      rank in which order its peers send.
    - `chunks[c]`: this rank's chunk c (virtual stage c*P + r), called as chunk(input, microbatch):
      the input is the microbatch itself on virtual stage 0 (anything, e.g. a dict of tensors), else
      the received activation; the microbatch gives later stages what they need besides the
      activation (e.g. the position ids of context parallelism); every other takes an activation of
      `activation_shape` / `dtype` and every chunk but the last virtual stage's must return one.
    - `microbatches`: M entries on every rank; only the first and last virtual stage read them.
    - `loss_sum_fn(output, microbatch)`: on the last virtual stage, the microbatch's token-loss sum.
    - `num_loss_tokens`: loss tokens in the global batch; each microbatch backpropagates
      loss_sum / num_loss_tokens.
    - `activation_shape`: the tensor crossing every stage boundary, e.g. [micro_batch,
      seq_len / cp / (tp if sequence parallel), hidden].
    Returns the loss sum (float32, 0 on ranks without the last virtual stage). With `forward_only`
    the backwards of the orders are skipped and nothing keeps a graph.
    """
    start_time = time.perf_counter()
    P, r = pp.size, pp.rank
    last_stage = P * vpp_size - 1
    num_microbatches = len(microbatches)
    if len(orders) != P or len(chunks) != vpp_size:
        raise ValueError(f"pipeline executor: got {len(orders)} orders for pp={P} and {len(chunks)} "
                         f"chunks for vpp={vpp_size}; need one order per pp rank and one chunk per vpp")
    if forward_only:
        orders = [[a for a in o if a[0] == FORWARD] for o in orders]
    order = orders[r]
    forwards = sum(1 for a in order if a[0] == FORWARD)
    if forwards != vpp_size * num_microbatches:
        raise ValueError(f"pipeline executor: the order of pp rank {r} has {forwards} forwards but "
                         f"vpp * microbatches = {vpp_size} * {num_microbatches}; build the orders "
                         f"for {num_microbatches} microbatches")
    shape = tuple(activation_shape)
    device = torch.device(device)
    inbox = _Inbox(orders, pp, vpp_size, shape, dtype, device)
    sends_in_flight: list[tuple[Any, torch.Tensor]] = []  # (work, the alias it reads from)
    saved: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}  # (chunk, mb) -> (input, output or loss)
    total = torch.zeros((), dtype=torch.float32, device=device)
    last_backward = max((i for i, a in enumerate(order) if a[0] == BACKWARD), default=-1)

    def post(send: tuple[Message, torch.Tensor, int] | None, next_index: int) -> None:
        """Send (if any) and post the receive of the next action's input, in one batch."""
        sends = []
        if send is not None:
            msg, tensor, dst = send
            if dst == r:
                inbox.local[msg] = tensor
            else:
                sends.append((tensor, dst))
        posted = inbox.recvs_up_to(_input_message(order[next_index], r, P, last_stage)) \
            if next_index < len(order) else []
        works = batch_send_recv(pp, sends=sends, recvs=[(b, p) for b, p, _ in posted])
        if sends:
            sends_in_flight.append((works[0], sends[0][0]))
        inbox.register(posted, works[len(sends):])
        sends_in_flight[:] = [(w, t) for w, t in sends_in_flight if not w.is_completed()]

    # The first action's input can be posted before anything runs.
    post(None, 0)
    for i, (kind, chunk, mb) in enumerate(order):
        s = chunk * P + r
        send = None
        if kind == FORWARD:
            if s == 0:
                x = microbatches[mb]
            else:
                x = inbox.take((FORWARD, s, mb), timing)
                if not forward_only:
                    x.requires_grad_(True)
            with torch.no_grad() if forward_only else nullcontext():
                out = chunks[chunk](x, microbatches[mb])
                if s == last_stage:
                    out = loss_sum_fn(out, microbatches[mb])
                    total = total + out.detach().float()
            if s != last_stage:
                _check_activation(out, shape, dtype, s)
                send = ((FORWARD, s + 1, mb), _sendable(out, keep_graph=not forward_only), (s + 1) % P)
            if not forward_only:
                saved[(chunk, mb)] = (x, out)
        else:
            x, out = saved.pop((chunk, mb))
            with no_sync() if i != last_backward else nullcontext():
                if s == last_stage:
                    torch.autograd.backward(out / num_loss_tokens)
                else:
                    grad = inbox.take((BACKWARD, s, mb), timing)
                    if out.data.shape != grad.shape:  # deallocated after its send
                        out.data = grad
                    torch.autograd.backward(out, grad_tensors=grad)
            if s > 0:
                dx = x.grad if x.grad is not None else torch.zeros(shape, dtype=dtype, device=device)
                send = ((BACKWARD, s - 1, mb), dx.contiguous(), (s - 1) % P)
        post(send, i + 1)
    for work, _ in sends_in_flight:
        work.wait()
    if saved or inbox.pending or inbox.local:
        raise RuntimeError(f"pipeline executor: pp rank {r} finished its order with {len(saved)} "
                           f"graphs, {len(inbox.pending)} receives and {len(inbox.local)} local messages "
                           "left over; the orders do not match each other")
    if timing is not None:
        timing.total_s += time.perf_counter() - start_time
    return total


def _input_message(action: Action, pp_rank: int, pp_size: int, last_stage: int) -> Message | None:
    """What `action` receives: the activation of stage s (F, s > 0) or the gradient of its output
    (B, s < last); None for the first stage's forward and the last stage's backward."""
    kind, chunk, mb = action
    s = chunk * pp_size + pp_rank
    if (kind == FORWARD and s > 0) or (kind == BACKWARD and s < last_stage):
        return (kind, s, mb)
    return None


def _check_activation(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, stage: int) -> None:
    if tuple(out.shape) != shape or out.dtype != dtype:
        raise ValueError(f"pipeline executor: virtual stage {stage} returned {tuple(out.shape)} {out.dtype} "
                         f"but activation_shape/dtype are {shape} {dtype}; every stage boundary carries "
                         "one fixed shape (pass the right activation_shape)")


def _sendable(out: torch.Tensor, keep_graph: bool) -> torch.Tensor:
    """The tensor to send for `out`; releases out's storage when that is safe (see module docstring)."""
    if out._base is not None or not out.is_contiguous():
        return out.detach().contiguous()  # a copy: freeing out's storage would not free the base's
    alias = out.detach()  # new TensorImpl on the same storage: survives out.data being swapped
    if keep_graph:
        out.data = torch.empty((1,), dtype=out.dtype, device=out.device)
    return alias
