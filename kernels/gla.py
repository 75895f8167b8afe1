"""Gated linear attention (GLA) ops with flash-linear-attention's signature and layout.

Per (batch, head), with a data-dependent log-space gate g_t <= 0 per key channel:

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        (state [K, V], updated before the readout)
    o_t = scale * q_t S_t                           (scale defaults to K ** -0.5)

Layout (fla's): q, k, g are [B, T, H, K]; v is [B, T, H, V]; states are [B, H, K, V] in fp32.

Ops:
- `chunk_gla`: the chunkwise-parallel form used for training (chunk 64, any T). Dispatches to the
  Triton kernels on CUDA (kernels/triton_gla.py) and to `chunk_gla_torch` elsewhere.
- `fused_recurrent_gla`: the step-by-step recurrence with fp32 accumulation (generation, and an
  independent second path).
- `naive_recurrent_gla`: the plain reference in the inputs' own dtype (pass float64 in tests).

Numerics of the chunk form: inside a chunk, b = cumsum(g) is non-increasing, so every factor
exp(b_i - b_j) with j <= i, exp(b_last - b_j) and exp(b_i) has a non-positive exponent. Scores inside
a chunk use secondary chunking by halves (64 -> 32 -> 16 -> 8): the lower-left quadrant of a block is
one matmul after rescaling both sides to the last position of its first half (exponents <= 0); the
8x8 diagonal blocks form exp(b_i - b_j) for j <= i only. Nothing overflows for any gate, unlike the
one-shot q*exp(b) @ (k*exp(-b))^T form. Gradients come from autograd through this torch code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import KernelsConfig, pick
from kernels.shapes import check_gla_shapes

CHUNK_SIZE = 64
# Secondary chunking halves blocks down to this many positions (pairwise factors below it).
LEAF_SIZE = 8


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 accumulation, or float64 when an input already is (reference-precision tests)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The definition, one step at a time, computed in q's dtype (the float64 test reference)."""
    check_gla_shapes(q, k, v, g, initial_state)
    batch, seq_len, heads, key_dim = q.shape
    scale = key_dim ** -0.5 if scale is None else scale
    dtype = q.dtype
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    if initial_state is not None:
        state = state + initial_state.to(dtype)
    outputs = []
    for t in range(seq_len):
        state = g[:, t].to(dtype).exp().unsqueeze(-1) * state + k[:, t].to(dtype).unsqueeze(-1) * v[:, t].to(dtype).unsqueeze(-2)
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape).to(dtype)
    return o, (state if output_final_state else None)


def fused_recurrent_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step recurrence with fp32 state and accumulation; output in v's dtype, state in fp32.

    Decays and scaled queries are formed for all steps at once, so each step is one multiply-add of
    the state and one readout.
    """
    check_gla_shapes(q, k, v, g, initial_state)
    batch, seq_len, heads, key_dim = q.shape
    scale = key_dim ** -0.5 if scale is None else scale
    dtype = _compute_dtype(q, k, v, g)
    q_scaled = (q.to(dtype) * scale).unsqueeze(-1)  # [B, T, H, K, 1]
    decay = g.to(dtype).exp().unsqueeze(-1)
    k_col, v_row = k.to(dtype).unsqueeze(-1), v.to(dtype).unsqueeze(-2)
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=dtype)
    if initial_state is not None:
        state = state + initial_state.to(dtype)
    outputs = []
    for t in range(seq_len):
        state = torch.addcmul(decay[:, t] * state, k_col[:, t], v_row[:, t])
        outputs.append((q_scaled[:, t] * state).sum(-2))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape, dtype=dtype)
    out_dtype = dtype if v.dtype == torch.float64 else v.dtype
    return o.to(out_dtype), (state if output_final_state else None)


def _intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor, leaf: int) -> torch.Tensor:
    """Causal scores A[i, j] = sum_c q_ic k_jc exp(b_ic - b_jc) for j <= i inside each block.

    q, k, b: [..., L, K] with b the within-chunk cumulative gate (non-increasing) -> A: [..., L, L].
    Secondary chunking by halves: the lower-left quadrant of a block is one matmul after rescaling
    the second half's queries and the first half's keys to the last position of the first half
    (both exponents <= 0); the two diagonal halves recurse, batched together, down to `leaf`
    positions, where the pairwise factor exp(b_i - b_j) is formed on j <= i only.
    """
    length = q.shape[-2]
    if length <= leaf:
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=q.device))
        exponent = (b.unsqueeze(-2) - b.unsqueeze(-3)).masked_fill(~causal[:, :, None], float("-inf"))
        return (q.unsqueeze(-2) * k.unsqueeze(-3) * torch.exp(exponent)).sum(-1)
    half = length // 2
    ref = b[..., half - 1 : half, :]
    q_late = q[..., half:, :] * torch.exp(b[..., half:, :] - ref)
    k_early = k[..., :half, :] * torch.exp(ref - b[..., :half, :])
    lower_left = q_late @ k_early.transpose(-1, -2)
    halves = [x.unflatten(-2, (2, half)) for x in (q, k, b)]
    diagonal = _intra_chunk_scores(*halves, leaf=leaf)  # [..., 2, half, half]
    top = torch.cat([diagonal[..., 0, :, :], torch.zeros_like(lower_left)], dim=-1)
    bottom = torch.cat([lower_left, diagonal[..., 1, :, :]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def chunk_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise GLA in pure torch (autograd gives the backward); fp32 accumulation, any T."""
    check_gla_shapes(q, k, v, g, initial_state)
    if chunk_size % LEAF_SIZE or (chunk_size // LEAF_SIZE) & (chunk_size // LEAF_SIZE - 1):
        raise ValueError(f"chunk_size={chunk_size} must be {LEAF_SIZE} times a power of two")
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    scale = key_dim ** -0.5 if scale is None else scale
    dtype = _compute_dtype(q, k, v, g)
    pad = (-seq_len) % chunk_size
    chunks = (seq_len + pad) // chunk_size

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, D] -> [B, H, N, C, D]; zero padding (k = v = 0, g = 0) leaves the state unchanged.
        x = F.pad(x.to(dtype).transpose(1, 2), (0, 0, 0, pad))
        return x.reshape(batch, heads, chunks, chunk_size, x.shape[-1])

    qc, kc, vc, gc = to_chunks(q), to_chunks(k), to_chunks(v), to_chunks(g)
    b = gc.cumsum(dim=-2)  # within-chunk cumulative log decay, non-increasing
    b_last = b[..., -1:, :]  # [B, H, N, 1, K]
    q_decayed = qc * torch.exp(b) * scale
    k_to_end = kc * torch.exp(b_last - b)
    chunk_updates = k_to_end.transpose(-1, -2) @ vc  # [B, H, N, K, V]
    chunk_decay = torch.exp(b_last).transpose(-1, -2)  # [B, H, N, K, 1]

    state = q.new_zeros(batch, heads, key_dim, value_dim, dtype=dtype)
    if initial_state is not None:
        state = state + initial_state.to(dtype)
    start_states = []
    for n in range(chunks):
        start_states.append(state)
        state = chunk_decay[:, :, n] * state + chunk_updates[:, :, n]
    inter = q_decayed @ torch.stack(start_states, dim=2) if chunks else q_decayed.new_zeros(vc.shape)
    scores = _intra_chunk_scores(qc, kc, b, LEAF_SIZE) * scale
    o = inter + scores @ vc
    o = o.reshape(batch, heads, chunks * chunk_size, value_dim)[:, :, :seq_len].transpose(1, 2)
    out_dtype = dtype if v.dtype == torch.float64 else v.dtype
    return o.to(out_dtype), (state if output_final_state else None)


def _chunk_gla_triton(*args, **kwargs):
    # Imported lazily: triton is optional and the torch path must work without it.
    from kernels.triton_gla import chunk_gla_triton

    return chunk_gla_triton(*args, **kwargs)


CHUNK_IMPLS = {"torch": chunk_gla_torch, "triton": _chunk_gla_triton}
RECURRENT_IMPLS = {"torch": fused_recurrent_gla_torch}


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    kernels: KernelsConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise GLA: (o [B, T, H, V], final state [B, H, K, V] fp32 or None).

    Differentiable in q, k, v, g and initial_state. `kernels` picks the backend (see
    kernels.dispatch); by default Triton on CUDA, torch elsewhere.
    """
    impl = pick(CHUNK_IMPLS, "chunk_gla", q.device, kernels)
    return impl(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    kernels: KernelsConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step GLA with the same signature and results as `chunk_gla` (O(T) sequential steps).

    Only a torch implementation exists; a Triton request falls back (or fails) as configured.
    """
    impl = pick(RECURRENT_IMPLS, "fused_recurrent_gla", q.device, kernels)
    return impl(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
