"""Decoding MLA models from a latent KV cache, and TPLA (docs/tpla.md).

- `config.py`: `DecodeConfig` (sampling, TPLA, the latent transform), typed, with its `check`;
- `sampling.py`: greedy, temperature and top-p choice of the next token;
- `latent_cache.py`: the per-layer cache of latents c (or this rank's slices of them) and RoPE keys;
- `latent_attention.py`: MLA's exact absorbed attention and TPLA's per-slice attention, pure functions;
- `tpla.py`: the decode attention of one MLA layer over its cache (exact MLA, or TPLA with g slices);
- `reparam.py`: orthogonal transforms of the latent (Hadamard, PCA) folded into the weights;
- `generation.py`: the prefill + decode loop over a DecoderModel (launch/generate.py).
"""
