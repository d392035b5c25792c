"""Generating text: cached incremental decoding, and the window re-reading sampler it replaces.

Cached decoding: a prefill fills per-layer caches of static shape, then one compiled step per token.

    from reformer_jax.decoding import generate
    tokens = generate(config, params, [prompt], max_new_tokens=200, rng=jax.random.key(0))

Modules: `cache` (what each layer type keeps, its allocation and size), `decode` (prefill and the one-token step,
on the parameters of `reformer_jax.model.reformer_lm.ReformerLM`), `generation` (the sampling loop on the device and the
API: generate, score), `beam_search` (Hugging Face's beam search on the same caches, a gather per step),
`window_sampler` (re-runs the model over a window for every token; the speed benchmark's baseline).
"""

from reformer_jax.decoding.beam_search import beam_search  # noqa: F401
from reformer_jax.decoding.generation import GenerateError, generate, score  # noqa: F401
