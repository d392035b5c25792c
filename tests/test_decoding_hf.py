"""Cached decoding of converted Hugging Face Reformers gives Hugging Face's cached generate: the same greedy tokens
and logits within 1e-4.

Skipped unless torch and transformers are installed (benchmarks/requirements-peers.txt), except under CI (the
environment variable CI=true), which installs them: there a missing peer fails the module. Hugging Face draws its
hash rotations at every call; with a fixed config.hash_seed every draw is the same, and the recorded draw is handed
to our generation, which draws once per sequence. Prompts shorter than a chunk (Hugging Face attends to every
position until it has buckets), as long as one, padded (13 -> 16) and a multiple of the chunk length.
"""

import importlib
import os

import numpy as np
import pytest

_load = importlib.import_module if os.environ.get("CI") == "true" else pytest.importorskip
torch = _load("torch")
transformers = _load("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from reformer_jax.model.hf_convert import from_hf  # noqa: E402
from reformer_jax.decoding.generation import Generation  # noqa: E402

# One worker: the cases of a model share its compiled decode steps and prefills.
pytestmark = pytest.mark.xdist_group("test_decoding_hf")

BASE = dict(hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=64, vocab_size=30,
            lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_hashes=2, num_buckets=4, is_decoder=True,
            axial_pos_shape=(8, 16), axial_pos_embds_dim=(16, 16), max_position_embeddings=128,
            hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
            pad_token_id=0, eos_token_id=2, hash_seed=7)
NEW_TOKENS = 64


LSH, MIXED = ("lsh", "lsh"), ("local", "lsh", "local", "lsh")
SLOW = pytest.mark.long
# The default run keeps one padded prompt of the LSH-only model and one short prompt of the mixed model, with
# NEW_TOKENS each, and the prompts of one chunk (8) and three (24) of both models with half as many (past four
# chunk boundaries, in half of Hugging Face's generate time); the long run checks the rest.
DEFAULT = {("lsh", 13): NEW_TOKENS, ("mixed", 5): NEW_TOKENS, ("lsh", 8): NEW_TOKENS // 2,
           ("lsh", 24): NEW_TOKENS // 2, ("mixed", 8): NEW_TOKENS // 2, ("mixed", 24): NEW_TOKENS // 2}
CASES = [pytest.param(layers, n, DEFAULT[name, n], id=f"{name}-{n}") if (name, n) in DEFAULT else
         pytest.param(layers, n, NEW_TOKENS, id=f"{name}-{n}", marks=SLOW)
         for name, layers in (("lsh", LSH), ("mixed", MIXED)) for n in (5, 8, 13, 24)]


@pytest.mark.parametrize("layers,prompt_len,new_tokens", CASES)
def test_greedy_generation_matches_hugging_face(layers, prompt_len, new_tokens, monkeypatch):
    torch.manual_seed(0)
    model = transformers.ReformerModelWithLMHead(transformers.ReformerConfig(**BASE, attn_layers=list(layers)))
    model = model.float().eval()
    draws, original = [], torch.randn

    def recording(*args, dtype=None, **kwargs):
        out = original(*args, **kwargs)
        draws.append(out.detach().numpy().copy())
        return out if dtype is None else out.to(dtype)

    monkeypatch.setattr(torch, "randn", recording)
    prompt = np.random.default_rng(prompt_len).integers(3, BASE["vocab_size"], (1, prompt_len))
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True,
                             eos_token_id=None, pad_token_id=0)
    expected_tokens = out.sequences.numpy()[0, prompt_len:]
    expected_logits = np.stack([step.numpy()[0] for step in out.logits])
    assert draws and all(np.array_equal(d, draws[0]) for d in draws)  # hash_seed: one set of rotations

    config, params = from_hf(model.state_dict(), model.config.to_dict())
    rotations = jnp.asarray(np.stack([draws[0]] * layers.count("lsh")))
    generation = Generation(config, params, [prompt[0]], rng=jax.random.key(0), lsh_rotations=rotations,
                            keep_logits=True)
    generation.set_sampling(greedy=True, temperature=1.0, top_k=None, top_p=None)
    generation.advance(new_tokens)
    np.testing.assert_array_equal(generation.tokens()[0], expected_tokens)
    logits = generation.logits()[0]
    error = np.max(np.abs(logits - expected_logits)) / np.max(np.abs(expected_logits))
    assert error <= 1e-4, f"logits differ by {error:.2e} of their largest value"
