"""A converted Hugging Face Reformer with a fixed hash_seed hashes as Hugging Face does: the rotations the conversion
records are the draw Hugging Face makes at every call of every LSH layer, and `evaluate --init_from` (which hashes
with them) gives Hugging Face's loss within 1e-4.

Skipped unless torch and transformers are installed (benchmarks/requirements-peers.txt), except under CI (the
environment variable CI=true), which installs them: there a missing peer fails the module.
"""

import importlib
import math
import os

import numpy as np
import pytest

_load = importlib.import_module if os.environ.get("CI") == "true" else pytest.importorskip
torch = _load("torch")
transformers = _load("transformers")

from reformer_jax import evaluate  # noqa: E402
from reformer_jax.convert import convert_dir, hf_lsh_rotations  # noqa: E402
from reformer_jax.training import saved_run  # noqa: E402

# Weights wider than Hugging Face's default (0.02), so that the hash rotations move the loss well beyond 1e-4.
BASE = dict(hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=32, vocab_size=258,
            lsh_attn_chunk_length=8, local_attn_chunk_length=8, lsh_num_chunks_before=1, local_num_chunks_before=1,
            is_decoder=True, axial_pos_shape=(8, 8), axial_pos_embds_dim=(8, 8), max_position_embeddings=64,
            hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
            pad_token_id=0, eos_token_id=None, initializer_range=0.3, hash_seed=11)


def hf_model(**changes):
    torch.manual_seed(0)
    return transformers.ReformerModelWithLMHead(transformers.ReformerConfig(**{**BASE, **changes})).float().eval()


def set_hash_seed(model, seed):
    for module in model.modules():
        if isinstance(module, transformers.models.reformer.modeling_reformer.LSHSelfAttention):
            module.hash_seed = seed


@pytest.mark.parametrize("layers,buckets,rounds", [(["lsh", "local", "lsh"], 4, 2), (["local", "lsh"], [2, 4], 3)])
def test_recorded_rotations_are_hugging_faces_draw(layers, buckets, rounds, monkeypatch):
    """Every torch.randn draw of a Hugging Face forward (one per LSH layer) equals the recorded rotations of that
    layer, for one bucket count and for factorised buckets; computing them leaves torch's global generator alone."""
    model = hf_model(attn_layers=layers, num_buckets=buckets, num_hashes=rounds)
    draws, original = [], torch.randn

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        draws.append(out.detach().numpy().copy())
        return out

    monkeypatch.setattr(torch, "randn", recording)
    with torch.no_grad():  # 24 tokens: longer than a chunk, so every LSH layer hashes
        model(torch.from_numpy(np.random.default_rng(0).integers(2, 258, (1, 24))))
    monkeypatch.undo()
    state = torch.get_rng_state()
    rotations = hf_lsh_rotations(model.config.to_dict())
    assert torch.equal(torch.get_rng_state(), state)
    width = sum(buckets) // 2 if isinstance(buckets, list) else buckets // 2
    assert rotations.dtype == np.float32 and rotations.shape == (layers.count("lsh"), 2, 8, rounds, width)
    assert len(draws) == layers.count("lsh")
    for recorded, draw in zip(rotations, draws):
        np.testing.assert_array_equal(recorded, draw)
    assert hf_lsh_rotations({**model.config.to_dict(), "hash_seed": None}) is None  # each call draws anew


@pytest.mark.parametrize("n_targets", [4 * 32, 3 * 32 + 19])
def test_evaluate_init_from_gives_hugging_faces_loss(tmp_path, n_targets):
    """save_pretrained -> convert -> evaluate --init_from scores a text window by window as Hugging Face does,
    within 1e-4: four whole windows, or three and a short one (19 targets, which Hugging Face pads to 24, a multiple
    of the chunk length, and evaluate pads as far: the first chunk looks back, wrapping, at the last one, so the
    width changes the scores); with another hash_seed Hugging Face's own loss moves by far more.

    One hash round: Hugging Face combines rounds by a float32 logsumexp taken at its self-mask value (-1e5, float32
    spacing 0.008 there), so a row that sees only its own position in every round (the first of a window) comes out
    0.2% short where ours (kernels/lsh.py) is exact; the README journey (tests/test_journeys.py) has two rounds and
    4096-token windows, where that moves the loss by less than 1e-7."""
    model = hf_model(attn_layers=["local", "lsh"], num_buckets=4, num_hashes=1)
    model.save_pretrained(tmp_path / "hf")
    summary = convert_dir(tmp_path / "hf", tmp_path / "converted")
    assert "hash rotations (hash_seed 11)" in summary
    np.testing.assert_array_equal(saved_run.open_model(str(tmp_path / "converted")).lsh_rotations,
                                  hf_lsh_rotations(model.config.to_dict()))
    text = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 2)[:n_targets + 1]
    (tmp_path / "text.txt").write_text(text)
    entry = evaluate.evaluate_run(str(tmp_path / "converted"), data_path=str(tmp_path / "text.txt"), seq_len=32,
                                  flag="--init_from")

    tokens = [b + 2 for b in text.encode()]
    windows = [tokens[i:i + 33] for i in range(0, len(tokens) - 1, 32)]

    def hf_loss():
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(model(torch.tensor([w[:-1]])).logits[0].double(),
                                                               torch.tensor(w[1:]), reduction="sum"))
                       for w in windows) / (len(tokens) - 1)

    expected = hf_loss()
    assert entry["tokens"] == len(tokens) - 1 == n_targets and len(windows) == 4
    assert entry["loss"] == pytest.approx(expected, rel=1e-4), (entry["loss"], expected)
    set_hash_seed(model, 12)
    other = hf_loss()
    assert math.isfinite(other) and abs(other - expected) > 10 * 1e-4 * expected, (other, expected)
