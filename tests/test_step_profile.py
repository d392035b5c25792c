"""The step profiler (reformer_jax.xla.profile; `benchmarks.speed --profile`): the HLO parser and op kinds on a
real compiled module, exclusive times from nested trace events, and the whole profile of a tiny step.

No timing is asserted: only that the ops are found, sorted into kinds and added up consistently.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import report, speed
from reformer_jax.xla import profile as step_profile
from reformer_jax.xla.profile import HloOp
from tests.test_benchmark_speed import TINY


def _compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile({"xla_cpu_experimental_ynn_fusion_type": ""}).as_text()


def test_parser_finds_the_kinds_and_flops_of_a_compiled_module():
    def fn(q, k, w, order):
        chunk = jnp.einsum("nqd,nsd->nqs", q, k)  # batched: [8, 16, 32] from [8, 16, 4] x [8, 32, 4]
        dense = w @ w.T  # [64, 64] from [64, 48] x [48, 64]
        rows = jnp.take_along_axis(w, order[:, None], axis=0)  # a gather of rows
        return chunk, dense, jnp.sort(order), rows

    args = (jnp.ones((8, 16, 4)), jnp.ones((8, 32, 4)), jnp.ones((64, 48)), jnp.arange(64, dtype=jnp.int32)[::-1])
    ops = step_profile.parse_hlo(_compiled_text(fn, *args))
    by_kind = {}
    for op in ops.values():
        by_kind.setdefault(step_profile.op_kind(op), []).append(op)
    assert {"chunk_matmul", "dense_matmul", "sort", "gather"} <= set(by_kind), sorted(by_kind)
    (chunk,) = by_kind["chunk_matmul"]
    assert chunk.dims == (8, 16, 32) and step_profile.dot_flops(chunk, ops) == 2 * 8 * 16 * 32 * 4
    dense = [op for op in by_kind["dense_matmul"] if op.opcode == "dot"]
    assert [op.dims for op in dense] == [(64, 64)] and step_profile.dot_flops(dense[0], ops) == 2 * 64 * 64 * 48
    assert all(op.shape and op.opcode for op in ops.values())


def test_instruction_lines_with_tuple_types_and_fusions():
    op = step_profile.parse_instruction(
        "  ROOT %tuple.3 = (s32[], f32[2,3]{1,0}, /*index=2*/f32[4]{0}) tuple(%a.1, %b.2, %c), metadata={x=1}")
    assert (op.name, op.opcode, op.dims, op.operands) == ("tuple.3", "tuple", (), ("a.1", "b.2", "c"))
    fusion = HloOp("f", "fusion", (4,), "f32[4]", frozenset({"parameter", "exponential", "reduce"}),
                   ", kind=kLoop, calls=%c", ())
    assert step_profile.op_kind(fusion) == "reduction"
    assert step_profile.op_kind(fusion._replace(inner=frozenset({"parameter", "concatenate", "slice"}))) == "movement"
    assert step_profile.op_kind(fusion._replace(attrs=", kind=kCustom, calls=%ynn")) == "library"
    assert step_profile.op_kind(HloOp("w", "while", (), "()", frozenset(), "", ())) == "control"
    assert step_profile.parse_instruction("ENTRY %main (p: f32[2]) -> f32[2] {") is None


def test_an_einsum_probe_reports_its_rate_from_its_own_shapes(monkeypatch):
    # 10 calls in 0.5 s of wall time and 0.25 s of process CPU time
    monkeypatch.setattr(step_profile, "wall_and_cpu", lambda fn: (0.5, 0.25, fn()))
    probe = step_profile.probe_einsum("nqk,nsk->nqs", [(3, 8, 4), (3, 16, 4)], "bfloat16", repeats=10)
    assert {k: probe[k] for k in ("einsum", "dtype", "shapes")} == {
        "einsum": "nqk,nsk->nqs", "dtype": "bfloat16", "shapes": [[3, 8, 4], [3, 16, 4]]}
    assert probe["us_per_call"] == pytest.approx(0.05e6)
    assert probe["gflops_per_s"] == pytest.approx(2 * 3 * 8 * 16 * 4 / 0.05 / 1e9)  # 2 x output x contracted
    assert probe["busy_cores"] == pytest.approx(0.5)


def test_exclusive_times_subtract_nested_ops_on_the_same_thread():
    events = [
        {"ph": "X", "name": "while.1", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
        {"ph": "X", "name": "dot.1", "ts": 10, "dur": 20, "pid": 1, "tid": 1},
        {"ph": "X", "name": "fusion.1", "ts": 50, "dur": 10, "pid": 1, "tid": 1},
        {"ph": "X", "name": "dot.1", "ts": 120, "dur": 5, "pid": 1, "tid": 1},
        {"ph": "X", "name": "dot.1", "ts": 20, "dur": 7, "pid": 1, "tid": 2},  # another thread: no parent
        {"ph": "X", "name": "ThunkExecutor::Execute", "ts": 0, "dur": 500, "pid": 1, "tid": 1},  # not an op
        {"ph": "i", "name": "fusion.1", "ts": 55, "pid": 1, "tid": 1},  # not a complete event
        {"ph": "X", "name": "loop_fusion_kernel", "args": {"hlo_op": "fusion.1"}, "ts": 0, "dur": 4, "pid": 2,
         "tid": 9},  # a GPU kernel event names its op in args
    ]
    times = step_profile.self_times(events, ["while.1", "dot.1", "fusion.1"])
    assert times == {"while.1": (70.0, 1), "dot.1": (32.0, 3), "fusion.1": (14.0, 2)}


def test_summary_adds_up_by_kind():
    ops = {"a": HloOp("a", "lhs", (8, 16, 4), "f32[8,16,4]", frozenset(), "", ()),
           "b": HloOp("b", "rhs", (8, 32, 4), "f32[8,32,4]", frozenset(), "", ()),
           "dot.1": HloOp("dot.1", "dot", (8, 16, 32), "f32[8,16,32]", frozenset(),
                          ", lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}", ("a", "b")),
           "sort.1": HloOp("sort.1", "sort", (64,), "s32[64]", frozenset(), "", ())}
    summary = step_profile.summarize(ops, {"dot.1": (300.0, 6), "sort.1": (100.0, 2)}, steps=2)
    kinds = {k["kind"]: k for k in summary["by_kind"]}
    assert summary["op_s_per_step"] == pytest.approx(200e-6)
    assert kinds["chunk_matmul"]["share"] == pytest.approx(0.75) and kinds["sort"]["ops_per_step"] == 1
    flops = 2 * 8 * 16 * 32 * 4
    assert kinds["chunk_matmul"]["gflops_per_s"] == pytest.approx(flops * 6 / 300.0 / 1e3)
    assert kinds["sort"]["gflops_per_s"] is None and [o["op"] for o in summary["top_ops"]] == ["dot.1", "sort.1"]


def test_profile_of_a_tiny_reformer_step_writes_its_files(tmp_path):
    settings = dataclasses.replace(TINY, profile=True, profile_steps=1, out_dir=str(tmp_path), seq_len=64)
    (row,) = speed.run(settings)
    kinds = {k["kind"]: k for k in row["by_kind"]}
    assert {"chunk_matmul", "dense_matmul", "sort", "gather"} <= set(kinds), sorted(kinds)
    assert sum(k["share"] for k in row["by_kind"]) == pytest.approx(1.0)
    assert sum(k["s_per_step"] for k in row["by_kind"]) == pytest.approx(row["op_s_per_step"])
    assert 0 < row["op_s_per_step"] and row["busy_cores"] > 0 and row["traced_step_s"] > 0
    assert [p["what"] for p in row["probes"]] == ["chunk product (one head, one round)",
                                                  "feed-forward matmul (one chunk)",
                                                  "chunk product over blocks of 2 chunks",
                                                  "chunk product over blocks of 4 chunks"]
    assert row["probes"][0]["shapes"] == [[4, 16, 16], [4, 32, 16]]  # length 64 / chunk 16, d_head 16
    # Blocks of 2 and 4 chunks: their queries against their keys and one look-back chunk, 2/3 and 2/5 of it used.
    assert [(p["shapes"], p["used"]) for p in row["probes"][2:]] == [
        ([[2, 32, 16], [2, 48, 16]], pytest.approx(2 / 3)), ([[1, 64, 16], [1, 80, 16]], pytest.approx(2 / 5))]
    assert "As one larger matmul per block of chunks" in (tmp_path / "speed_profile.md").read_text()
    with open(tmp_path / "speed_profile.json") as f:
        assert json.load(f) == json.loads(json.dumps([row]))
    markdown = (tmp_path / "speed_profile.md").read_text()
    assert "| batched matmuls (attention chunk products) |" in markdown and "Command: `pytest`" in markdown
    assert (tmp_path / "speed_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = "\n".join(report.sections(str(tmp_path), "results"))
    assert "## Where the training step's time goes" in section and "(results/speed_profile.json)" in section
