"""A compiled program's peak in parts, from the compiler's own buffer assignment (reformer_jax/xla/buffers.py)."""

import os

import jax
import jax.numpy as jnp
import pytest

from reformer_jax import ModelConfig
from reformer_jax.xla import buffers, tpu
from reformer_jax.training.step_builder import step_breakdown

TINY = dict(vocab_size=64, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=128, chunk_len=16, n_hashes=2)
needs_libtpu = pytest.mark.skipif(not tpu.libtpu_available() and os.environ.get("CI") != "true",
                                  reason=f"libtpu is not installed ({tpu.LIBTPU_PIP})")


def _gradscan(w, x):
    """The gradient of a scan over 3 layers of tanh(c @ w_i): w [3, 64, 64], x [256, 64]."""
    def loss(w):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()
    return jax.grad(loss)(w)


def test_a_scanned_gradient_splits_into_parts_that_sum_to_its_peak(tmp_path):
    shapes = (jax.ShapeDtypeStruct((3, 64, 64), jnp.float32), jax.ShapeDtypeStruct((256, 64), jnp.float32))
    compiled = jax.jit(_gradscan).lower(*shapes).compile(buffers.dump_options(str(tmp_path), "jit__gradscan"))
    analysis = compiled.memory_analysis()
    assignment = buffers.read_dump(str(tmp_path), "jit__gradscan")
    assert assignment.heap_bytes == analysis.temp_size_in_bytes  # XLA:CPU's temporaries are its heap
    curve = buffers.heap_in_use(assignment)
    assert 0 < curve.max() <= assignment.heap_bytes
    # The residuals of the 3 layers (tanh outputs, [3, 256, 64]) are live together at the start of the backward.
    assert curve.max() >= 3 * 256 * 64 * 4
    parts = buffers.breakdown(assignment, buffers.Shapes(((3, 64, 64),), stream_elements=256 * 64),
                              argument_parts=[("arguments", analysis.argument_size_in_bytes)],
                              output_bytes=analysis.output_size_in_bytes, alias_bytes=analysis.alias_size_in_bytes,
                              temp_bytes=analysis.temp_size_in_bytes)
    peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
            + analysis.temp_size_in_bytes)
    assert sum(b for _, b in parts.parts) == parts.peak_bytes == peak
    assert parts.part("memory_analysis beyond the heap") == 0 and parts.part("tile padding") == 0
    assert parts.part("residual streams and cotangents") >= 3 * 256 * 64 * 4  # the stream-sized residuals
    assert parts.heap_in_use_bytes == curve.max() and parts.largest[0]["bytes"] == max(h["bytes"] for h in
                                                                                       parts.largest)


def test_tile_padding_is_the_bytes_beyond_the_shape():
    padded = buffers.Value("copy.1{}", size=2 * 1024 * 64 * 4, offset=0, shape="f32[1,1024,64]{2,1,0:T(8,128)}",
                           start=0, end=1)
    assert (padded.dtype, padded.dims, padded.unpadded) == ("f32", (1, 1024, 64), 1024 * 64 * 4)
    assert buffers.Held(padded, padded.size, "").padding == 1024 * 64 * 4
    assert buffers.Held(padded, padded.size // 2, "").padding == 1024 * 64 * 2  # half its bytes held: half of it
    packed = buffers.Value("p{}", size=256, offset=0, shape="pred[16,16]{1,0:T(8,128)(4,1)}", start=0, end=1)
    assert packed.unpadded == 256
    tuple_value = buffers.Value("t{}", size=512, offset=0, shape="(f32[], s32[])", start=0, end=1)
    assert tuple_value.dtype == "tuple" and tuple_value.unpadded == 512


@pytest.mark.parametrize("op_name, scope", [
    ("jit(s)/transpose(jvp(L.loss))/layers/reversible_stack/while/body/closed_call/reversible_layer_backward/"
     "attention_block_reverse/attention_heads_backward/while/body/closed_call/transpose(jvp(lsh_attention))/"
     "lsh_rounds_backward/while/body/closed_call/concatenate", "lsh_rounds (backward)"),
    ("jit(s)/jvp(L.loss)/layers/reversible_stack/while/body/closed_call/reversible_layer/attention_block/lsh_hash/"
     "dot_general", "lsh_hash (forward)"),
    ("jit(s)/transpose(jvp(L.loss))/ReformerLM.streams/embedding/mul", "embedding (backward)"),
    ("jit(s)/jvp(L.loss)/add", "other ops"),
    ("", "unnamed"),
])
def test_a_value_belongs_to_its_innermost_named_scope(op_name, scope):
    assert buffers.scope_of(op_name, buffers.SCOPES) == scope


def test_an_instruction_without_an_op_name_takes_its_operands_or_callers():
    hlo = "\n".join([
        "%body (arg_tuple.1: (s32[], f32[4])) -> (s32[], f32[4]) {",
        "  %arg_tuple.1 = (s32[], f32[4]{0}) parameter(0)",
        "  %get-tuple-element.2 = f32[4]{0} get-tuple-element(%arg_tuple.1), index=1",
        '  ROOT %tuple.3 = (s32[], f32[4]{0}) tuple(%get-tuple-element.2), metadata={op_name="jit(f)/inner"}',
        "}",
        "ENTRY %main.9 (p: f32[4]) -> f32[4] {",
        "  %p = f32[4]{0} parameter(0)",
        '  %while.5 = (s32[], f32[4]{0}) while(%tuple.4), condition=%cond, body=%body, metadata={op_name="jit(f)/while"}',
        "  ROOT %copy.6 = f32[4]{0} copy(%while.5)",
        "}"])
    names = buffers.parse_op_names(hlo)
    assert names["tuple.3"] == "jit(f)/inner"  # its own
    assert names["copy.6"] == names["while.5"] == "jit(f)/while"  # its operand's
    assert names["arg_tuple.1"] == names["get-tuple-element.2"] == "jit(f)/while"  # the loop that calls its body


def test_the_training_steps_parts_sum_to_its_peak():
    stats, parts = step_breakdown(ModelConfig.preset("reformer", **TINY), batch_size=1, seq_len=128)
    assert parts.peak_bytes == stats.peak_bytes
    assert parts.part("parameters") == stats.param_bytes and parts.part("gradients") > 0
    assert parts.part("residual streams and cotangents") >= 4 * 128 * 32 * 4  # y1, y2 and their cotangents


@needs_libtpu
def test_on_a_tpu_chip_the_parts_sum_to_its_peak_too():
    stats, parts = step_breakdown(ModelConfig.preset("reformer", **TINY), batch_size=1, seq_len=128,
                                  topology="v5e:1x1")
    assert stats.device_kind == "TPU v5 lite" and parts.peak_bytes == stats.peak_bytes
    # libtpu's temporaries exceed the heap the compiler lays out (its fragmentation counted again), never fall short
    assert parts.part("memory_analysis beyond the heap") >= 0
    assert parts.part("tile padding") > 0  # the head axis (16 wide here) takes a 128-lane tile


@needs_libtpu
@pytest.mark.long  # two compilations of the tiny step (XLA:CPU and a v5e chip), about 20 s on 2 cores
def test_the_tpu_experiments_breakdown_part_writes_both_programs_side_by_side(tmp_path):
    from absl import flags

    from benchmarks import memory
    from benchmarks.output import read_json

    fv = flags.FlagValues()
    memory.define_flags(fv)
    argv = ["prog", "--experiment=tpu", "--tpu_parts=breakdown", "--tpu_breakdown_lengths=128", "--d_model=32",
            "--n_heads=2", "--d_ff=64", "--n_layers=2", "--chunk_len=16", "--n_hashes=2", "--vocab_size=64",
            "--seq_len=128", f"--out_dir={tmp_path}"]
    fv(argv)
    memory.run(memory.settings_from_flags(fv, argv))
    rows = read_json(os.path.join(tmp_path, "tpu_breakdown.json"))
    assert [(r["seq_len"], r["topology"]) for r in rows] == [(128, "XLA:CPU"), (128, "v5e:1x1")]
    for row in rows:
        assert sum(p["bytes"] for p in row["parts"]) == row["peak_bytes"]
        assert "--tpu_parts=breakdown" in row["row_command"] and "--tpu_breakdown_lengths=128" in row["row_command"]
    with open(os.path.join(tmp_path, "tpu_breakdown.md")) as f:
        text = f.read()
    assert "| part | XLA:CPU MiB | v5e:1x1 MiB | v5e:1x1 - XLA:CPU |" in text and "| **peak** |" in text
    assert os.path.exists(os.path.join(tmp_path, "tpu_breakdown.png"))
