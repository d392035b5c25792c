"""Cached decoding: the step's logits equal the forward pass's, the LSH chunk lookup equals a sort, one compilation,
batched prompts of different lengths, sampling settings and refusals."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from reformer_jax.model.config import ModelConfig
from reformer_jax.decoding import cache as cache_lib
from reformer_jax.decoding import generation as gen
from reformer_jax.model.reformer_lm import ReformerLM, init_params

SMALL = dict(d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=320, dropout=0.0, local_chunk_len=60)


def _rel_err(got, expected):
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def _decoded_logits(config, params, tokens, prefix=1):
    """Next-token logits at positions prefix - 1 .. l - 1 by cached decoding, feeding the given tokens."""
    generation = gen.Generation(config, params, list(tokens[:, :prefix]), rng=jax.random.key(0),
                                forced=tokens[:, prefix:], keep_logits=True)
    generation.set_sampling(greedy=True, temperature=1.0, top_k=None, top_p=None, forced=True)
    generation.advance(tokens.shape[1] - prefix)
    return np.concatenate([generation.logits(), np.asarray(generation.state["logits"])[:, None]], axis=1)


@pytest.mark.parametrize("reversible", [False, True], ids=["plain", "reversible"])
@pytest.mark.parametrize("attention", ["full", "local"])
def test_cached_logits_equal_the_forward_pass_at_every_position(attention, reversible):
    config = ModelConfig(attention=attention, reversible=reversible, sequential_heads=reversible, **SMALL)
    params = init_params(config, jax.random.key(1))
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (2, 300)).astype(np.int32)
    expected = np.asarray(ReformerLM(config).apply({"params": params}, jnp.asarray(tokens)))
    for prefix in (1, 77):  # decoded from the first token, and after a prefill of 77 (padded to 120 / 128)
        got = _decoded_logits(config, params, tokens, prefix)
        assert got.shape == (2, 300 - prefix + 1, config.vocab_size)
        assert _rel_err(got, expected[:, prefix - 1:]) < 1e-5


def _sorted_window(buckets, position, chunk_len, n_before):
    """Hugging Face's cached LSH lookup by brute force: stable sort of positions 0..position by bucket, the
    chunk holding the newest position and the chunks before it, ranks modulo position + 1. [h, r, W]."""
    h, r, _ = buckets.shape
    out = np.zeros((h, r, (n_before + 1) * chunk_len), np.int64)
    for i in range(h):
        for j in range(r):
            order = np.argsort(buckets[i, j, :position + 1], kind="stable")
            rank = int(np.nonzero(order == position)[0][0])
            start = (rank // chunk_len - n_before) * chunk_len
            out[i, j] = order[np.mod(start + np.arange(out.shape[-1]), position + 1)]
    return out


@pytest.mark.parametrize("chunk_len,n_before", [(4, 1), (3, 2), (8, 0)])
def test_lsh_chunk_lookup_equals_sorting_every_position(chunk_len, n_before):
    rng = np.random.default_rng(chunk_len)
    h, r, length, n_buckets = 2, 3, 40, 6
    buckets = rng.integers(0, n_buckets, (h, r, length)).astype(np.uint8)
    prompt = 5
    index = cache_lib.new_bucket_index(jnp.asarray(buckets), jnp.int32(prompt), n_buckets)
    stored = jnp.asarray(np.where(np.arange(length) < prompt, buckets, 0).astype(np.uint8))
    insert = jax.jit(cache_lib.insert)
    lookup = jax.jit(cache_lib.chunk_positions, static_argnames=("chunk_len", "n_chunks_before"))
    for position in range(prompt, length):
        new = jnp.asarray(buckets[:, :, position])
        index, stored = insert(index, stored, new, jnp.int32(position))
        window = lookup(index, stored, new, jnp.int32(position), chunk_len=chunk_len, n_chunks_before=n_before)
        np.testing.assert_array_equal(np.asarray(window), _sorted_window(buckets, position, chunk_len, n_before),
                                      err_msg=f"position {position}")


def _reference_lsh_step(h, wqk, wv, rotations, position, *, chunk_len, n_before, full_until):
    """Hugging Face's cached LSH attention of `position`, float64 numpy, from the normalised layer inputs
    h [L, d] of positions 0 .. position: shared-QK keys of unit length, buckets argmax([xR, -xR]) per head and
    round; per round, positions 0 .. position stably sorted by bucket, the chunk holding `position` and the
    n_before chunks before it (ranks modulo position + 1); own score -1e5; rounds combined by the softmax of
    their logsumexps. Up to full_until every position 0 .. position instead. -> ([h, k], buckets [h, r, L])."""
    qk = np.einsum("ld,dhk->hlk", h, wqk)
    v = np.einsum("ld,dhk->hlk", h, wv)
    keys = qk / np.linalg.norm(qk, axis=-1, keepdims=True)
    rotated = np.einsum("hlk,hkrn->hrln", qk, rotations)
    buckets = np.argmax(np.concatenate([rotated, -rotated], axis=-1), axis=-1)
    n_heads, n_rounds = buckets.shape[:2]
    width = (n_before + 1) * chunk_len
    out = np.zeros((n_heads, qk.shape[-1]))
    for i in range(n_heads):
        if position <= full_until:
            windows = [np.arange(position + 1)]
        else:
            windows = []
            for r in range(n_rounds):
                order = np.argsort(buckets[i, r, :position + 1], kind="stable")
                rank = int(np.nonzero(order == position)[0][0])
                start = (rank // chunk_len - n_before) * chunk_len
                windows.append(order[np.mod(start + np.arange(width), position + 1)])
        scores = [np.where(w == position, -1e5, keys[i, w] @ qk[i, position]) for w in windows]
        lse = np.array([np.log(np.sum(np.exp(s - s.max()))) + s.max() for s in scores])
        weights = np.exp(lse - lse.max()) / np.sum(np.exp(lse - lse.max()))
        for weight, s, w, round_lse in zip(weights, scores, windows, lse):
            out[i] += weight * np.exp(s - round_lse) @ v[i, w]
    return out, buckets


@pytest.mark.parametrize("prompt_len", [3, 10], ids=["shorter-than-a-chunk", "longer"])
def test_lsh_decode_step_equals_an_independent_float64_reference(prompt_len):
    """The cached LSH step's attention output at every position after the prompt, against
    `_reference_lsh_step` (shares no code with the library); 3 hash rounds, chunks of 4, one chunk back."""
    from reformer_jax.decoding import decode

    config = cache_lib.decode_config(ModelConfig(attention="lsh", n_layers=1, d_model=32, n_heads=2, d_ff=64,
                                                 max_len=40, chunk_len=4, n_hashes=3, n_buckets=4, dropout=0.0))
    params = init_params(config, jax.random.key(11))
    attn_params, _ = decode.layer_params(config, params, 0)
    rotations = gen._rotations(config, jax.random.key(12), None)  # [1, h, k, r, n_b / 2]
    rng = np.random.default_rng(prompt_len)
    prompt = rng.integers(3, config.vocab_size, prompt_len).astype(np.int32)
    padded = decode.prefill_length(config, prompt_len, True)
    caches, _ = jax.jit(decode.prefill, static_argnums=(0, 5))(
        config, params, jnp.asarray(np.pad(prompt, (0, padded - prompt_len)))[None], jnp.asarray([prompt_len]),
        rotations, config.max_len)
    cache = jax.tree.map(lambda x: x[0], caches[0])
    full_until = decode.hf_full_until(config, prompt_len)
    x = params["embed"][prompt] + decode.position_table(config, params)[:prompt_len]
    h = [np.asarray(decode._normed(config, attn_params, x), np.float64)]  # the prompt's normalised inputs
    h.append(rng.standard_normal((config.max_len - prompt_len, config.d_model)).astype(np.float32))
    h = np.concatenate(h)
    step = jax.jit(functools.partial(decode._lsh_step, config))
    as64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    worst = 0.0
    for position in range(prompt_len, config.max_len):
        out, cache = step(attn_params, cache, jnp.asarray(h[position], jnp.float32), jnp.int32(position),
                          jnp.int32(full_until), rotations[0])
        expected, buckets = _reference_lsh_step(h[:position + 1].astype(np.float64), as64(attn_params["qk"]),
                                                as64(attn_params["v"]), as64(rotations[0]), position,
                                                chunk_len=config.chunk_len, n_before=config.n_chunks_before,
                                                full_until=full_until)
        np.testing.assert_array_equal(np.asarray(cache["buckets"])[..., :position + 1], buckets)
        worst = max(worst, _rel_err(np.asarray(out, np.float64), expected))
    assert worst <= 1e-5, f"the step's output differs from the reference by {worst:.2e} of its largest value"


@pytest.fixture(scope="module")
def lsh_model():
    config = ModelConfig(attn_layers=("local", "lsh"), n_layers=2, d_model=32, n_heads=2, d_ff=64, max_len=128,
                         chunk_len=8, local_chunk_len=8, n_hashes=2, dropout=0.0)
    return config, init_params(config, jax.random.key(2))


def test_decode_step_compiles_once_for_every_prompt_length_and_setting(lsh_model):
    config, params = lsh_model
    prompts = [[5, 6, 7], [8] * 11], [[9] * 20, [4] * 2]
    settings = [dict(greedy=True), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.5)]
    before = gen.decode_step_compilations()
    for i, (batch, setting) in enumerate(zip(prompts * 2, settings * 2)):
        gen.generate(config, params, batch, max_new_tokens=3 + i, rng=jax.random.key(i), **setting)
    assert gen.decode_step_compilations() == before + 1


BATCHED = {  # every attention type the step has, and a mixed stack; chunks of 8 (one hash round: rows share them)
    "full": dict(attention="full", reversible=True),
    "local": dict(attention="local", local_chunk_len=8),
    "lsh": dict(attention="lsh", chunk_len=8, n_hashes=1, n_buckets=4),
    "mixed": dict(attn_layers=("local", "lsh"), n_layers=2, chunk_len=8, local_chunk_len=8, n_hashes=1, n_buckets=4),
}


@pytest.mark.parametrize("name", list(BATCHED))
def test_batched_prompts_of_different_lengths_match_generating_each_alone(name):
    """Greedy tokens exactly, and the logits they were picked from within 1e-5 of their largest value."""
    # max_len 128: full and local models prefill every prompt padded to 128 (one compilation for both alone).
    config = ModelConfig(**{**SMALL, "max_len": 128, "n_layers": 1, **BATCHED[name]})
    params = init_params(config, jax.random.key(3))
    # 21 tokens: past a local layer's 16-slot window (its ring buffer wraps); 5: shorter than a chunk.
    prompts = [np.random.default_rng(0).integers(3, config.vocab_size, 21), np.array([33, 6, 6, 6, 6])]

    def decoded(rows):
        generation = gen.Generation(config, params, rows, rng=jax.random.key(0), keep_logits=True)
        generation.set_sampling(greedy=True, temperature=1.0, top_k=None, top_p=None)
        generation.advance(12)
        return generation.tokens(), generation.logits()

    tokens, logits = decoded(prompts)
    for row, prompt in enumerate(prompts):
        alone_tokens, alone_logits = decoded([prompt])
        np.testing.assert_array_equal(tokens[row], alone_tokens[0], err_msg=f"prompt {row}")
        assert _rel_err(logits[row], alone_logits[0]) <= 1e-5, f"prompt {row}"


def test_sampling_settings(lsh_model):
    config, params = lsh_model
    prompt, key = [[5, 6, 7, 8, 9]], jax.random.key(4)
    greedy = gen.generate(config, params, prompt, max_new_tokens=16, greedy=True, rng=key)
    np.testing.assert_array_equal(gen.generate(config, params, prompt, max_new_tokens=16, top_k=1, rng=key), greedy)
    np.testing.assert_array_equal(gen.generate(config, params, prompt, max_new_tokens=16, top_p=1e-6, rng=key), greedy)
    first, log_probs = gen.generate(config, params, prompt, max_new_tokens=16, rng=key, return_log_probs=True)
    np.testing.assert_array_equal(gen.generate(config, params, prompt, max_new_tokens=16, rng=key), first)
    assert log_probs.shape == (1, 16) and np.all(log_probs <= 0)
    other = gen.generate(config, params, prompt, max_new_tokens=16, rng=jax.random.key(5))
    assert not np.array_equal(other, first)  # a near-uniform random model: another seed, other tokens


@pytest.mark.parametrize("arguments,named", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[5] * 120], max_new_tokens=9), "max_len=128"),
    (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), "top_p=1.5"),
    (dict(temperature=0.0), "greedy=True"), (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=0), "top_k=0"), (dict(max_new_tokens=0), "max_new_tokens=0"),
])
def test_bad_arguments_are_refused_in_one_line(lsh_model, arguments, named):
    config, params = lsh_model
    arguments = {"prompts": [[5, 6]], "max_new_tokens": 4, **arguments}
    with pytest.raises(gen.GenerateError, match=named.replace("[", r"\[").replace(".", r"\.")) as error:
        gen.generate(config, params, arguments.pop("prompts"), rng=jax.random.key(0), **arguments)
    assert "\n" not in str(error.value)


def test_cli_refuses_a_workdir_without_a_checkpoint_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "run_settings.json").write_text('{"model": {}}')
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "reformer_jax.generate", f"--workdir={tmp_path}", "--prompt=ROMEO:"],
                            cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: --workdir={tmp_path} is not a main.py workdir: expected run_settings.json and checkpoints/ in it "
        "(pass the --workdir a training run used)."]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()  # nothing created in the user's directory


@pytest.mark.long  # trains a model for 60 steps: about a minute on 2 cores
def test_cached_decoding_scores_a_trained_lsh_model_within_two_percent_of_the_forward_pass(tmp_path):
    """Bits per character of validation text: the training forward pass (LSH over whole sequences) and cached
    decoding (Hugging Face's per-token chunk lookup) attend to different positions, and must still agree."""
    import math

    from corpus import corpus_path
    from reformer_jax.training import data
    from reformer_jax.training.evaluation import token_scores
    from reformer_jax.training.loop import TrainOptions, train_and_evaluate

    dataset = data.load_dataset("text", seq_len=64, data_path=str(corpus_path(tmp_path)))
    config = ModelConfig.preset("reformer", d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=64, chunk_len=16,
                                n_hashes=2)
    options = TrainOptions(workdir=str(tmp_path / "run"), steps=60, batch_size=8, seq_len=64, dataset="text",
                           eval_every=0, sample_len=0, analyze_memory=False, learning_rate=5e-3, warmup_steps=5,
                           checkpoint_every=0)
    params = train_and_evaluate(config, options, dataset=dataset)["state"].params
    batch = dataset.batch("validation", 0, 0, 8, 64)
    forward, _ = token_scores(config, params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]),
                              jax.random.key(1))
    decoded = gen.score(config, params, batch["inputs"], rng=jax.random.key(2))  # scores tokens 1 .. 63
    forward_bpc = -float(np.mean(np.asarray(forward)[:, :-1])) / math.log(2)
    decoded_bpc = -float(np.mean(decoded)) / math.log(2)
    assert forward_bpc < 6.0  # trained past uniform over bytes (8 bits)
    assert abs(decoded_bpc / forward_bpc - 1) < 0.02, (forward_bpc, decoded_bpc)


def test_full_attention_reads_its_cache_block_by_block_as_it_reads_all_of_it():
    """A step's full attention over the cache up to its position, a block at a time, against one softmax over the
    whole cache with the later positions masked: every position of a 10-position cache, blocks of 4 (the last
    block, positions 6 .. 9, shares 6 and 7 with the one before it) and of 16 (one block)."""
    from reformer_jax.decoding import decode

    keys_rng, values_rng, query_rng = jax.random.split(jax.random.key(3), 3)
    keys = jax.random.normal(keys_rng, (2, 10, 8))
    values = jax.random.normal(values_rng, (2, 10, 8))
    qk = jax.random.normal(query_rng, (2, 8))
    for block in (4, 16):
        blocked = jax.jit(functools.partial(decode._attend_prefix, block=block))
        for position in range(10):
            got, expected = blocked(qk, keys, values, position), decode._attend_all(qk, keys, values, position)
            np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6,
                                       err_msg=f"block {block}, position {position}")


def test_cached_full_attention_in_blocks_equals_the_forward_pass(monkeypatch):
    """Blocks of 48 positions over a 200-position cache (the last block clamped), two rows decoding together: the
    logits at every position are the forward pass's."""
    from reformer_jax.decoding import decode

    monkeypatch.setattr(decode, "FULL_BLOCK", 48)
    config = ModelConfig(attention="full", reversible=False, sequential_heads=False,
                         **{**SMALL, "max_len": 200, "d_ff": 40})  # sizes of their own: a decode loop of its own
    params = init_params(config, jax.random.key(4))
    tokens = np.random.default_rng(5).integers(3, config.vocab_size, (2, 200)).astype(np.int32)
    expected = np.asarray(ReformerLM(config).apply({"params": params}, jnp.asarray(tokens)))
    got = _decoded_logits(config, params, tokens, prefix=50)
    assert _rel_err(got, expected[:, 49:]) < 1e-5
