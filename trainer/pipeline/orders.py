"""Pipeline orders and virtual stages (pure: no processes, no tensors; docs/pipeline.md).

An order is one pipeline rank's sequence of compute actions, `(kind, chunk, microbatch)` with kind
"F" (forward) or "B" (backward) and `chunk` the rank-local model chunk. Chunk c of pp rank r is
virtual stage c*P + r (docs/pipeline.md, "Virtual stages"); `split_layers` gives each virtual stage
its layers. trainer/pipeline/simulator.py checks orders against each other;
trainer/pipeline/executor.py runs one with p2p communication.
"""
from __future__ import annotations

from collections.abc import Sequence

FORWARD, BACKWARD = "F", "B"
Action = tuple[str, int, int]  # (kind, chunk, microbatch)


def one_f_one_b_order(pp_size: int, num_microbatches: int, pp_rank: int) -> list[Action]:
    """Megatron's non-interleaved 1F1B order for rank `pp_rank` (one chunk per rank).

    Warmup: min(P - r - 1, M) forwards; steady state: (F, B) pairs for the remaining forwards;
    cooldown: the backwards left. Example P=2, M=4: rank 0 F0 F1 B0 F2 B1 F3 B2 B3, rank 1
    F0 B0 F1 B1 F2 B2 F3 B3. Rank r thus holds at most min(P - r, M) microbatches' activations.
    """
    _check_rank(pp_size, pp_rank)
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches = {num_microbatches}; need at least 1 microbatch")
    warmup = min(pp_size - pp_rank - 1, num_microbatches)
    steady = num_microbatches - warmup
    order: list[Action] = [(FORWARD, 0, m) for m in range(warmup)]
    for i in range(steady):
        order += [(FORWARD, 0, warmup + i), (BACKWARD, 0, i)]
    order += [(BACKWARD, 0, m) for m in range(steady, num_microbatches)]
    return order


def check_interleaved(pp_size: int, vpp_size: int, num_microbatches: int, group_size: int | None = None) -> int:
    """Validate the interleaved schedule's microbatch rules; return the group size G (default P).

    Rules (Megatron): P <= G <= M, and M % G == 0 or M % G >= P. A group (the last, shorter one
    included) must cover the pipeline depth: with fewer than P microbatches a rank reaches chunk
    c+1 of a microbatch before the last rank has produced it, and the orders deadlock (e.g. P=4,
    V=3, M=9, G=4) or at least lose the (P-1)/(V*M) bubble (trainer/pipeline/simulator.py shows which).
    """
    P, V, M = pp_size, vpp_size, num_microbatches
    G = P if group_size is None else group_size
    if P < 1 or V < 1 or M < 1:
        raise ValueError(f"interleaved 1F1B: pp={P}, vpp={V}, microbatches={M}; all must be >= 1")
    if not P <= G <= M:
        hint = (f"use at least {P} microbatches per step (a multiple of {P})" if M < P
                else f"set the microbatch group size between pp={P} and microbatches={M}")
        raise ValueError(f"interleaved 1F1B needs pp <= microbatch group size <= microbatches, got "
                         f"pp={P}, group size={G}, microbatches={M}; {hint}")
    if M % G != 0 and M % G < P:
        raise ValueError(f"interleaved 1F1B: microbatches={M} leaves a last group of {M % G} "
                         f"microbatches (group size {G}), fewer than pp={P}; use a multiple of {G} "
                         f"microbatches (e.g. {M - M % G} or {M - M % G + G}) or a group size that divides {M}")
    return G


def interleaved_microbatch_table(num_microbatches: int, vpp_size: int, group_size: int) -> list[tuple[int, int]]:
    """The k-th forward of every rank as (chunk, microbatch): groups of G microbatches run on chunk
    0, then on chunk 1, ...; the last group takes whatever microbatches remain (fewer than G)."""
    table: list[tuple[int, int]] = []
    for start in range(0, num_microbatches, group_size):
        group = range(start, min(start + group_size, num_microbatches))
        table += [(c, m) for c in range(vpp_size) for m in group]
    return table


def interleaved_1f1b_order(pp_size: int, vpp_size: int, num_microbatches: int, pp_rank: int,
                           group_size: int | None = None) -> list[Action]:
    """Megatron's interleaved 1F1B order for rank `pp_rank` with `vpp_size` chunks per rank.

    Forward k runs table[k] of `interleaved_microbatch_table`; backward k runs the same microbatch
    on chunk V-1-chunk(k) (the last virtual stage is backpropagated first). Warmup on rank r is
    2*(P - r - 1) + (V - 1)*G forwards, capped at M*V; then (F, B) pairs; then the backwards left.
    With vpp_size == 1 this is `one_f_one_b_order` (the interleaved warmup would only hold more
    activations for the same bubble).
    """
    _check_rank(pp_size, pp_rank)
    if vpp_size == 1:
        return one_f_one_b_order(pp_size, num_microbatches, pp_rank)
    G = check_interleaved(pp_size, vpp_size, num_microbatches, group_size)
    table = interleaved_microbatch_table(num_microbatches, vpp_size, G)
    total = len(table)
    warmup = min(2 * (pp_size - pp_rank - 1) + (vpp_size - 1) * G, total)

    def backward(k: int) -> Action:
        chunk, m = table[k]
        return (BACKWARD, vpp_size - 1 - chunk, m)

    order: list[Action] = [(FORWARD, *table[k]) for k in range(warmup)]
    for k in range(total - warmup):
        order += [(FORWARD, *table[warmup + k]), backward(k)]
    order += [backward(k) for k in range(total - warmup, total)]
    return order


def pipeline_orders(pp_size: int, vpp_size: int, num_microbatches: int, group_size: int | None = None,
                    forward_only: bool = False) -> list[list[Action]]:
    """Every pp rank's order (index = pp rank): 1F1B for vpp_size 1, interleaved 1F1B otherwise.

    `forward_only` keeps only the forwards (evaluation); they keep their relative order, which
    stays deadlock-free because forwards depend only on forwards.
    """
    orders = [interleaved_1f1b_order(pp_size, vpp_size, num_microbatches, r, group_size) for r in range(pp_size)]
    if forward_only:
        orders = [[a for a in order if a[0] == FORWARD] for order in orders]
    return orders


def virtual_stage(chunk: int, pp_rank: int, pp_size: int) -> int:
    """The virtual pipeline stage of chunk `chunk` on pp rank `pp_rank`: chunk*P + rank."""
    return chunk * pp_size + pp_rank


def split_layers(num_layers: int, pp_size: int, vpp_size: int = 1,
                 explicit: Sequence[int] | None = None) -> list[list[int]]:
    """The global layer ids of each virtual stage (index = virtual stage c*P + r).

    Even split when num_layers % (P*V) == 0; else `explicit`, the number of layers of each of the
    P*V virtual stages (consecutive layers, in virtual-stage order, summing to num_layers).
    """
    stages = pp_size * vpp_size
    if explicit is None:
        if pp_size < 1 or vpp_size < 1 or num_layers % stages:
            raise ValueError(f"num_layers={num_layers} does not split evenly over pp={pp_size} x "
                             f"vpp={vpp_size} = {stages} virtual stages; use a multiple of {stages} "
                             f"layers or give an explicit list of {stages} per-stage layer counts")
        counts = [num_layers // stages] * stages
    else:
        counts = list(explicit)
        if len(counts) != stages or sum(counts) != num_layers or min(counts) < 0:
            raise ValueError(f"explicit layer split {counts} must have pp*vpp = {pp_size}*{vpp_size} = "
                             f"{stages} non-negative entries summing to num_layers={num_layers}")
    out, start = [], 0
    for n in counts:
        out.append(list(range(start, start + n)))
        start += n
    return out


def to_torch_actions(order: Sequence[Action], pp_size: int, pp_rank: int) -> list[str]:
    """An order in torch.distributed.pipelining's action notation: `{virtual stage}{F|B}{microbatch}`,
    e.g. chunk 1 of rank 0 with P=2 running backward of microbatch 2 is `2B2`."""
    return [f"{virtual_stage(c, pp_rank, pp_size)}{kind}{m}" for kind, c, m in order]


def _check_rank(pp_size: int, pp_rank: int) -> None:
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp rank {pp_rank} is not in a pipeline of {pp_size} ranks; need 0 <= rank < pp")
