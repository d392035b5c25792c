"""The bidirectional encoder and its three heads against Hugging Face's: random-weight ReformerForMaskedLM,
ReformerForSequenceClassification and ReformerForQuestionAnswering (local and LSH layers mixed, chunks after > 0, a
padded batch) converted by `hf_convert.from_hf` give Hugging Face's outputs within 1e-4 relative and its loss within
1e-5.

Hugging Face forms an LSH row that sees no key but itself (a chunk of padding between chunks of padding) through a
float32 logsumexp of its -1e5 self-mask value, 0.2% short (see tests/test_bidirectional_hf.py), and the question-
answering loss's softmax runs over padded positions too; so the batch's padding is kept short enough that no row
sees only itself, and padded positions are left out of the per-position comparisons. No real position's output
depends on the padding (tests/test_encoder.py).

Skipped unless torch and transformers are installed, except under CI (CI=true), where a missing peer fails the
module.
"""

import importlib
import os

import numpy as np
import pytest

_load = importlib.import_module if os.environ.get("CI") == "true" else pytest.importorskip
torch = _load("torch")
transformers = _load("transformers")

import jax.numpy as jnp  # noqa: E402

from reformer_jax.model.hf_convert import from_hf, hf_lsh_rotations  # noqa: E402
from reformer_jax.model.reformer_lm import model_for  # noqa: E402
from reformer_jax.training.step import metrics_from_sums  # noqa: E402

B, L = 3, 32
BASE = dict(hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=32, vocab_size=40,
            lsh_attn_chunk_length=4, local_attn_chunk_length=4, lsh_num_chunks_before=1, local_num_chunks_before=1,
            lsh_num_chunks_after=1, local_num_chunks_after=1, num_buckets=4, num_hashes=2, is_decoder=False,
            axial_pos_shape=(4, 8), axial_pos_embds_dim=(8, 8), max_position_embeddings=L, hidden_dropout_prob=0.0,
            lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0, pad_token_id=0,
            eos_token_id=None, initializer_range=0.1, hash_seed=5, num_labels=3)
HEADS = {"ReformerForMaskedLM": "lm", "ReformerForSequenceClassification": "classification",
         "ReformerForQuestionAnswering": "question_answering"}
LAYOUTS = [dict(attn_layers=["local", "lsh", "local", "lsh"]),
           dict(attn_layers=["lsh", "local"], lsh_num_chunks_before=0, local_num_chunks_after=2)]


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 40, (B, L))
    mask = np.ones((B, L), np.int64)
    # Padded tails of at most one whole chunk plus part of another: in every LSH round the padding sorts into the
    # last chunks, and a whole chunk of it then still looks ahead at a chunk of real keys (see the module docstring).
    mask[1, 25:] = 0
    mask[2, 27:] = 0
    tokens[mask == 0] = 0
    return tokens, mask


def _convert(hf):
    state = {name: tensor.detach().numpy() for name, tensor in hf.state_dict().items()}
    config, params = from_hf(state, hf.config.to_dict())
    return config, params, hf_lsh_rotations(hf.config.to_dict())


def _hf(architecture, layout):
    torch.manual_seed(0)
    labels = 2 if architecture == "ReformerForQuestionAnswering" else BASE["num_labels"]  # start and end
    return getattr(transformers, architecture)(transformers.ReformerConfig(
        **{**BASE, **layout, "num_labels": labels})).float().eval()


def _close(ours, theirs, where=None):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    if where is not None:
        ours, theirs = ours[where], theirs[where]
    scale = np.max(np.abs(theirs))
    np.testing.assert_array_less(np.max(np.abs(ours - theirs)) / scale, 1e-4)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["local-lsh x2", "lsh-local"])
@pytest.mark.parametrize("architecture", list(HEADS))
def test_converted_encoder_equals_hugging_face(architecture, layout):
    hf = _hf(architecture, layout)
    config, params, rotations = _convert(hf)
    assert config.head == HEADS[architecture] and not config.causal
    assert (config.n_chunks_after, config.local_n_chunks_after) == (1, layout.get("local_num_chunks_after", 1))
    tokens, mask = _batch()
    real = mask.astype(bool)
    model = model_for(config)
    run = lambda **kw: model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(real),  # noqa
                                   lsh_rotations=rotations, **kw)
    loss = lambda batch: float(metrics_from_sums(model.apply(  # noqa: E731
        {"params": params}, {k: jnp.asarray(v) for k, v in batch.items()}, lsh_rotations=rotations,
        method=type(model).batch_loss_terms))[0])
    t_tokens, t_mask = torch.from_numpy(tokens), torch.from_numpy(mask)
    if architecture == "ReformerForMaskedLM":
        labels = np.where(real & (np.arange(L) % 3 == 0), tokens, -100)
        with torch.no_grad():
            out = hf(t_tokens, attention_mask=t_mask, labels=torch.from_numpy(labels))
        _close(run(), out.logits.numpy(), real)
        ours = loss({"inputs": tokens, "targets": np.maximum(labels, 0), "weights": (labels >= 0).astype(np.float32),
                     "attention_mask": real})
    elif architecture == "ReformerForSequenceClassification":
        labels = np.array([0, 2, 1])
        with torch.no_grad():
            out = hf(t_tokens, attention_mask=t_mask, labels=torch.from_numpy(labels))
        _close(run(), out.logits.numpy())
        ours = loss({"inputs": tokens, "attention_mask": real, "labels": labels})
    else:
        starts, ends = np.array([3, 5, 0]), np.array([9, 17, 26])
        with torch.no_grad():
            out = hf(t_tokens, attention_mask=t_mask, start_positions=torch.from_numpy(starts),
                     end_positions=torch.from_numpy(ends))
        start, end = run()
        _close(start, out.start_logits.numpy(), real)
        _close(end, out.end_logits.numpy(), real)
        ours = loss({"inputs": tokens, "attention_mask": real, "start_positions": starts, "end_positions": ends})
    assert abs(ours - out.loss.item()) < 1e-5, (ours, out.loss.item())


def test_head_is_read_from_the_state_dict():
    """A classifier's state dict converts to a classifier whatever the config's architectures say; a tensor of
    another head is refused by name."""
    hf = _hf("ReformerForSequenceClassification", LAYOUTS[1])
    state = {name: tensor.detach().numpy() for name, tensor in hf.state_dict().items()}
    config, params = from_hf(state, {**hf.config.to_dict(), "architectures": ["ReformerForMaskedLM"]})
    assert config.head == "classification" and config.num_labels == 3
    assert config.classifier_dropout is None  # Hugging Face's default: the head takes hidden_dropout_prob
    config, _ = from_hf(state, {**hf.config.to_dict(), "classifier_dropout": 0.3, "hidden_dropout_prob": 0.1})
    assert (config.classifier_dropout, config.dropout) == (0.3, 0.1)
    assert params["classifier"]["out_proj"]["kernel"].shape == (16, 3)
    with pytest.raises(ValueError, match="qa_outputs.weight"):
        from_hf({**state, "qa_outputs.weight": np.zeros((2, 32))}, hf.config.to_dict())
