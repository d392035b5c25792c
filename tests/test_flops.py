"""The training step's FLOP count (`reformer_jax.model.flops`) against counts written out by hand, and against the
matrix products of a compiled step."""

import pytest

from reformer_jax import ModelConfig
from reformer_jax.model import flops
from conftest import USER_CODEGEN

# A tiny reversible stack with one layer of each attention type: b 2, l 16, d 8, h 2 heads of k 3, d_ff 5,
# vocabulary 11; LSH: chunks of 4 seeing 2 chunks before, 3 rounds, buckets (4, 2) -> 4 / 2 + 2 / 2 = 3 hash
# columns; local: chunks of 8 seeing 1 before; the "concat" head (width 2 d = 16).
TINY = ModelConfig(vocab_size=11, d_model=8, n_heads=2, d_head=3, d_ff=5, n_layers=3, max_len=32,
                   attn_layers=("lsh", "local", "full"), reversible=True, n_hashes=3, chunk_len=4, n_buckets=(4, 2),
                   n_chunks_before=2, local_chunk_len=8, local_n_chunks_before=1, output_head="concat",
                   tie_embeddings=False, pos_embedding="absolute")
B, L = 2, 16

# By hand, 2 FLOPs per multiply-add:
PROJECTION = 2 * B * L * 8 * (2 * 3)  # one [b l, d] x [d, h k] projection (or its transpose, the output): 3072
HAND_FORWARD = {
    # LSH and full layers: qk, v, out; the local layer: q, k, v, out.
    "projections": 3 * PROJECTION + 4 * PROJECTION + 3 * PROJECTION,  # 30720
    "feed_forward": 3 * (2 * B * L * 8 * 5 + 2 * B * L * 5 * 8),  # 15360
    # Scores and weighted sum, 2 b h l s k each: LSH s = (2 + 1) * 4 = 12 in each of 3 rounds; local s = (1 + 1) * 8
    # = 16; full s = l = 16.
    "attention": (3 * 2 * (2 * B * 2 * L * 12 * 3)  # 27648
                  + 2 * (2 * B * 2 * L * 16 * 3) + 2 * (2 * B * 2 * L * 16 * 3)),  # 12288 + 12288 = 52224
    "hashing": 2 * B * 2 * L * 3 * (3 * 3),  # [b h l, k] x [k, r n] with r 3 rounds of n 3 columns: 3456
    "output_head": 2 * B * L * 16 * 11,  # 11264
}


def test_each_part_of_a_mixed_reversible_stack_against_a_hand_count():
    counted = flops.train_step_flops(TINY, B, L)
    assert {part: p.forward for part, p in counted.parts.items()} == HAND_FORWARD
    differentiated = ("projections", "feed_forward", "attention", "output_head")  # the hash is not
    assert {part: p.backward for part, p in counted.parts.items()} == {
        part: 2 * HAND_FORWARD[part] if part in differentiated else 0 for part in HAND_FORWARD}
    layers = ("projections", "feed_forward", "attention")  # the stack recomputes its layers, keeping the buckets
    assert {part: p.recompute for part, p in counted.parts.items()} == {
        part: HAND_FORWARD[part] if part in layers else 0 for part in HAND_FORWARD}
    assert counted.forward == 30720 + 15360 + 52224 + 3456 + 11264 == 113024
    assert counted.total == 113024 + 2 * (113024 - 3456) + (30720 + 15360 + 52224) == 430464
    assert counted.to_dict()["parts"]["attention"] == {"forward": 52224, "backward": 104448, "recompute": 52224,
                                                       "total": 208896}


def test_no_recomputation_without_a_reversible_stack_and_default_buckets_follow_the_length():
    # lsh preset, ordinary residuals; n_buckets None: 2 * 16 / 4 = 8 buckets at l 16 -> 4 hash columns; one chunk
    # before (the default); a tied "mean" head of width d.
    config = ModelConfig.preset("lsh", vocab_size=11, d_model=8, n_heads=2, d_ff=5, n_layers=2, max_len=32,
                                n_hashes=2, chunk_len=4)
    counted = flops.train_step_flops(config, 1, 16)
    assert counted.recompute == 0
    per_layer_hashing = 2 * 1 * 2 * 16 * 4 * (2 * 4)  # b 1, h 2, l 16, k 4, 2 rounds of 4 columns
    per_layer_attention = 2 * (2 * 1 * 2 * 2 * 16 * (2 * 4) * 4)  # 2 rounds, s = (1 + 1) * 4
    assert counted.parts["hashing"].forward == 2 * per_layer_hashing == 4096
    assert counted.parts["attention"].forward == 2 * per_layer_attention == 16384
    assert counted.parts["output_head"].forward == 2 * 16 * 8 * 11


def test_look_ahead_chunks_and_a_sequence_of_one_local_chunk():
    # n_chunks_after widens what a chunk sees; a local sequence no longer than its chunk is one chunk, no look-back.
    assert flops.attention_product_flops("lsh", batch=1, heads=1, length=8, d_head=2, chunk_len=4, n_chunks_before=1,
                                         n_chunks_after=1, n_hashes=2) == 2 * 2 * 2 * 8 * (3 * 4) * 2
    assert flops.attention_product_flops("local", batch=1, heads=1, length=8, d_head=2, chunk_len=16,
                                         n_chunks_before=1) == 2 * 2 * 8 * 8 * 2
    with pytest.raises(ValueError, match="kind='axial' is invalid"):
        flops.keys_seen("axial", 8, chunk_len=4, n_chunks_before=1)


def test_a_length_the_model_refuses_is_refused():
    with pytest.raises(ValueError, match="seq_len=18 is not a multiple of ModelConfig.chunk_len=4"):
        flops.train_step_flops(TINY, 1, 18)


def test_a_bidirectional_encoder_with_a_classification_head():
    # Local chunks of 8 seeing 1 before and 1 after (s = 24), LSH chunks of 4 seeing 1 before and 2 after (s = 16,
    # 2 rounds); the head reads the first position only: dense [d, d] and out_proj [d, 3].
    config = ModelConfig(vocab_size=11, d_model=8, n_heads=2, d_ff=5, n_layers=2, max_len=32,
                         attn_layers=("local", "lsh"), causal=False, n_hashes=2, chunk_len=4, n_buckets=4, n_chunks_before=1, n_chunks_after=2,
                         local_chunk_len=8, local_n_chunks_before=1, local_n_chunks_after=1, head="classification",
                         num_labels=3, pos_embedding="absolute")
    counted = flops.train_step_flops(config, 2, 32)
    assert counted.parts["attention"].forward == 2 * (2 * 2 * 2 * 32 * 24 * 4) + 2 * 2 * (2 * 2 * 2 * 32 * 16 * 4)
    assert counted.parts["output_head"].forward == 2 * 2 * (8 * 8 + 8 * 3)


@pytest.mark.parametrize("head", ["lm", "classification"])
def test_the_matrix_products_of_a_compiled_unrolled_step_are_the_count(head):
    """A step with no loop in it (layers unrolled, no chunked loss, heads at once, no LSH: its hash and rounds
    loop): the products in XLA's compiled program (2 x output size x contracted size of each dot) add up to the count
    exactly. XLA's cost_analysis counts elementwise work too, so it is above it. The token head's causal stack
    looks 2 local chunks back; the classification head's bidirectional one 1 back and 1 ahead."""
    from reformer_jax.training.step_builder import build_train_step
    from reformer_jax.xla.compiler_options import step_compiler_options
    from reformer_jax.xla import profile

    window = (dict(local_n_chunks_before=2) if head == "lm" else
              dict(local_n_chunks_before=1, local_n_chunks_after=1, causal=False, head=head, num_labels=3))
    config = ModelConfig.preset("transformer", vocab_size=37, d_model=16, n_heads=2, d_ff=24, n_layers=2, max_len=32,
                                attn_layers=("local", "full"), local_chunk_len=8, dropout=0.0, scan_layers=False,
                                output_chunk_len=0, pos_embedding="absolute", **window)
    compiled = build_train_step(config, compiler_options={**step_compiler_options(), **USER_CODEGEN}).compile(2, 32)
    ops = profile.parse_hlo(compiled.as_text())
    assert not [op for op in ops.values() if op.opcode == "while"], "the step has a loop: its body counts once"
    dots = [profile.dot_flops(op, ops) for op in ops.values() if op.opcode == "dot"]
    counted = flops.train_step_flops(config, 2, 32)
    assert dots and None not in dots and sum(dots) == counted.total
    assert profile.xla_flops(compiled) > counted.total
