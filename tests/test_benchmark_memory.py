"""The memory benchmark driver end to end at tiny sizes, its parsers and its flag checks.

One module-scoped run covers every experiment (the driver memoises compilations within a process, and the tiny
sizes are chosen so experiments share them); the compile uses LLVM -O0 (--fast_compile), which leaves XLA's buffer
assignment, and so every figure, unchanged.
"""

import csv
import dataclasses
import json
import math
import os
import types

import pytest
from absl import flags

from benchmarks import memory, output, runtime

from reformer_jax.xla import timeline
from reformer_jax.xla.memory_analysis import floor_bytes, stats_from_analysis
from reformer_jax.xla.memory_analysis import MemoryStats

# Its module-scoped fixtures are expensive: keep the module on one pytest-xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_benchmark_memory")

TINY = memory.Settings(
    vocab_size=32, d_model=32, n_heads=2, d_ff=64, n_layers=2, seq_len=256, n_hashes=2, chunk_len=16, dropout=0.0,
    hash_sweep=(1, 2), layer_sweep=(1, 2), lengths=(128, 256), seqlen_optimizer="adafactor",
    runtime_models=("transformer",), floor_hashes=(1, 2), floor_layers=(1, 2), floor_lengths=(128,),
    floor_long_len=256, floor_speed_layers=1, floor_speed_steps=1, floor_real_len=0, fast_compile=True,
    command="pytest")
# Per experiment: the models it runs at these sizes (variants needs all four for the ordering checks).
PLAN = [("variants", memory.PRESETS), ("hashes", memory.PRESETS), ("layers", memory.PRESETS),
        ("seqlen", ("transformer", "reformer")), ("timeline", ("transformer",)),
        ("floor", memory.PRESETS), ("runtime", memory.PRESETS), ("encoder", ("transformer", "reformer"))]
ROW_FIELDS = {f.name for f in dataclasses.fields(MemoryStats)} | {
    "model", "seq_len", "n_layers", "n_hashes", "batch_size", "d_model", "dtype", "optimizer", "backend",
    "jax_version", "jaxlib_version", "platform", "cpu_count", "command"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    dumps = tmp_path_factory.mktemp("dumps")
    rows = {}
    for name, models in PLAN:
        settings = dataclasses.replace(TINY, experiment=name, models=models, out_dir=str(out), dump_dir=str(dumps))
        rows.update(memory.run(settings))
    return types.SimpleNamespace(out=str(out), dumps=str(dumps), rows=rows)


def by_model(rows):
    return {r["model"]: r for r in rows}


@pytest.mark.parametrize("name", memory.EXPERIMENTS)
def test_every_experiment_writes_its_files_and_fields(results, name):
    base = os.path.join(results.out, name)
    with open(base + ".json") as f:
        rows = json.load(f)
    assert rows and rows == json.loads(json.dumps(results.rows[name]))
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["peak_bytes"] == row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
        assert row["backend"] == "cpu" and row["command"] == "pytest"
    with open(base + ".csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and ROW_FIELDS <= set(table[0])
    with open(base + ".md") as f:
        assert f.read().startswith("# ")
    with open(base + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(results.out) if p.endswith(".tmp")]


def test_variant_ordering(results):
    peak = {m: r["peak_bytes"] for m, r in by_model(results.rows["variants"]).items()}
    assert all(peak["transformer"] > peak[m] for m in ("lsh", "reversible", "reformer")), peak
    assert peak["reformer"] == min(peak.values()), peak
    assert all(r["seed_mb"] is None for r in results.rows["variants"])  # not the seed's sizes


def test_hashes_and_layers(results):
    hashes = sorted(results.rows["hashes"], key=lambda r: r["n_hashes"])
    assert [r["n_hashes"] for r in hashes] == [1, 2]
    # Flat in hash rounds (measured +0.13% here; the README's setup and the all-rounds-at-once contrast:
    # tests/test_memory_claims.py).
    assert hashes[1]["peak_bytes"] <= 1.01 * hashes[0]["peak_bytes"], [r["peak_bytes"] for r in hashes]
    layers = results.rows["layers"]
    growth = {m: [r["peak_bytes"] for r in sorted(layers, key=lambda r: r["n_layers"]) if r["model"] == m]
              for m in ("reformer", "transformer")}
    assert growth["transformer"][1] - growth["transformer"][0] > 2 * (growth["reformer"][1] - growth["reformer"][0])


def test_seqlen_exponents_beside_table5(results):
    rows = by_model(results.rows["seqlen"])
    assert rows["transformer"]["table5_exponent"] == 2 and rows["reformer"]["table5_exponent"] == 1
    assert abs(rows["reformer"]["fitted_exponent"] - 1) < 0.25
    assert rows["transformer"]["fitted_exponent"] > rows["reformer"]["fitted_exponent"] + 0.2


def test_fit_exponent():
    lengths = [1024, 2048, 4096, 8192]
    assert memory.fit_exponent(lengths, [3 * n**2 for n in lengths]) == pytest.approx(2)
    assert memory.fit_exponent(lengths, [5 * n + 0.0 for n in lengths]) == pytest.approx(1)
    assert memory.fit_exponent([2, 4], [10, 10]) == pytest.approx(0)
    for bad in (([1024], [1.0]), ([1024, 2048], [0.0, 1.0]), ([8, 8], [1.0, 2.0])):
        with pytest.raises(ValueError):
            memory.fit_exponent(*bad)


def test_timeline_rows(results):
    rows = by_model(results.rows["timeline"])
    assert rows["transformer"]["scan_layers"] is False  # unrolled, so each layer shows as a step
    for r in rows.values():
        assert r["dump_module"].startswith("jit_")
        assert 0.85 * r["peak_bytes"] <= r["curve_peak_bytes"] <= 1.15 * r["peak_bytes"]
        assert len(r["curve_x"]) == len(r["curve_bytes"]) <= 400 and r["curve_x"][-1] == pytest.approx(1, abs=0.01)
        assert r["peak_by_scope"] and r["peak_by_scope"][0]["bytes"] >= r["peak_by_scope"][-1]["bytes"]
    scopes = {s["scope"] for s in rows["transformer"]["peak_by_scope"]}
    assert any(s.startswith("shared_qk_attention") for s in scopes), scopes


def test_timeline_parser_on_a_real_dump(results):
    assignment, live = timeline.find_dump(os.path.join(results.dumps, "transformer"))
    with open(live) as f:
        ranges = timeline.parse_live_ranges(f.read())
    with open(assignment) as f:
        sizes = timeline.parse_value_sizes(f.read())
    assert 0 <= ranges.peak_step < ranges.schedule_len and ranges.peak_bytes > 0
    assert sum(size for _, size in ranges.breakdown) == ranges.peak_bytes  # top level entries add up
    assert all(0 <= a <= b < ranges.schedule_len for a, b in ranges.ranges.values())
    curve = timeline.live_bytes_curve(ranges, sizes)
    assert len(curve) == ranges.schedule_len and curve.min() >= 0
    # The rebuilt curve at XLA's peak step is close to XLA's own total there.
    assert curve[ranges.peak_step] == pytest.approx(ranges.peak_bytes, rel=0.1)
    with pytest.raises(ValueError, match="HloLiveRange"):
        timeline.parse_live_ranges("nothing here")
    with pytest.raises(FileNotFoundError, match="xla_dump_to"):
        timeline.find_dump(results.out)


def test_scope_names():
    assert timeline.scope_of("jit(train_step)/jvp(ReformerLM)/layers/residual_stack/residual_layer/attention_block/"
                             "shared_qk_attention/exp") == "shared_qk_attention (forward)"
    assert timeline.scope_of("jit(train_step)/transpose(jvp(ReformerLM))/layers/residual_stack/residual_layer/"
                             "feed_forward_block/dot_general") == "feed_forward_block (backward)"
    assert timeline.scope_of("state") == "inputs: state"
    assert timeline.scope_of("dot.38") == "unnamed XLA temporaries"


def test_runtime_on_cpu(results):
    (row,) = results.rows["runtime"]
    assert row["model"] == "transformer" and row["steps"] == 2 and len(row["step_s"]) == 2
    assert "RSS" in row["runtime_source"] and row["runtime_peak_bytes"] > 0
    assert all(math.isfinite(x) for x in row["losses"])
    # The kernel's high-water mark (ru_maxrss, KiB converted to bytes) bounds every RSS sample taken before it.
    assert row["ru_maxrss_after_bytes"] >= row["rss_max_bytes"] > row["rss_base_bytes"] > 0
    assert row["runtime_peak_bytes"] == row["rss_max_bytes"] - row["rss_base_bytes"]


def test_runtime_worker_result_line():
    result = {"runtime_peak_bytes": 5, "step_s": [0.5]}
    line = runtime.RESULT_PREFIX + json.dumps(result)
    assert runtime.parse_result("compiling...\n" + line + "\n") == result
    with pytest.raises(ValueError, match="RUNTIME_RESULT"):
        runtime.parse_result("Traceback ...")


def test_floor_targets(results):
    rows = {r["target"]: r for r in results.rows["floor"]}
    assert set(rows) == {"1", "1s", "2", "3", "4a", "5"}
    for r in rows.values():
        assert r["status"] == ("pass" if r["measured"] <= r["limit"] else "short")
    # Target 1 holds at these sizes too (measured 1.001); targets 2, 3 and 4a need the README's sizes, where
    # tests/test_memory_claims.py checks them.
    assert rows["1"]["status"] == "pass" and rows["1"]["measured"] <= 1.01, rows["1"]["measured"]
    assert rows["5"]["measured"] == pytest.approx(rows["5"]["peak_bytes"] / 2**30)
    assert rows["1s"]["measured"] == pytest.approx(rows["1s"]["step_s_rounds_True_heads_True"]
                                                   / rows["1s"]["step_s_rounds_False_heads_False"])
    r = rows["4a"]
    expected = 2 * r["param_bytes"] + r["optimizer_state_bytes"] + r["batch_bytes"] + 4 * 1 * 128 * 32 * 4
    assert floor_bytes(param_bytes=r["param_bytes"], optimizer_state_bytes=r["optimizer_state_bytes"],
                       batch_bytes=r["batch_bytes"], batch_size=1, seq_len=128, d_model=32) == expected
    assert r["floor_bytes"] == expected
    assert r["measured"] == pytest.approx(r["peak_bytes"] / expected, rel=1e-3)
    # Every benchmark row carries the floor.
    for name, experiment_rows in results.rows.items():
        for row in experiment_rows:
            assert row["floor_bytes"] > 0 and row["peak_over_floor"] == pytest.approx(
                row["peak_bytes"] / row["floor_bytes"], rel=1e-3), name


def test_stats_from_analysis_matches_the_library_formula():
    analysis = types.SimpleNamespace(argument_size_in_bytes=1000, output_size_in_bytes=900, alias_size_in_bytes=800,
                                     temp_size_in_bytes=5000)
    import jax
    params = {"w": jax.ShapeDtypeStruct((10, 10), "float32")}
    batch = {"x": jax.ShapeDtypeStruct((2, 4), "int32")}
    stats = stats_from_analysis(analysis, params, {"m": params["w"]}, batch, "cpu", d_model=8)
    assert stats.peak_bytes == 1000 + 900 - 800 + 5000
    assert stats.activation_bytes == stats.peak_bytes - 2 * 400 - 400 - 32
    assert stats.floor_bytes == 2 * 400 + 400 + 32 + 4 * 2 * 4 * 8 * 4


def parse(*args):
    fv = flags.FlagValues()
    memory.define_flags(fv)
    fv(["prog", *args])
    return memory.settings_from_flags(fv, ["prog", *args])


def test_flag_defaults_are_the_seed_setup():
    s = parse()
    assert (s.vocab_size, s.d_model, s.n_heads, s.d_ff, s.n_layers, s.seq_len, s.n_hashes, s.chunk_len,
            s.batch_size) == (259, 512, 8, 2048, 6, 4096, 8, 64, 1)
    assert s.hash_sweep == (1, 2, 4, 8, 16) and s.layer_sweep == (2, 4, 6, 8, 10, 12)
    assert s.lengths == tuple(2**k for k in range(10, 17)) and s.floor_long_len == 2**20
    assert parse("--hash_sweep=2, 4", "--models=reformer").hash_sweep == (2, 4)
    assert s.command == "python -m benchmarks.memory"


@pytest.mark.parametrize("args, message", [
    (["--experiment=memory"], "--experiment='memory' is unknown; expected one of variants"),
    (["--hash_sweep=1,two"], "--hash_sweep=1,two: 'two' is not an integer; expected a comma-separated list such as"),
    (["--layer_sweep=0,2"], "--layer_sweep=0,2: 0 is below 1"),
    (["--lengths=1000,2048"], "--lengths: length 1000 is not a multiple of --chunk_len=64, which LSH attention "
                              "needs; e.g. 960"),
    (["--seq_len=100"], "--seq_len: length 100 is not a multiple of --chunk_len=64"),
    (["--models=reformer,gpt"], "--models=reformer,gpt: unknown 'gpt'; expected a comma-separated subset"),
    (["--dtype=fp16"], "--dtype='fp16' is unknown; expected one of float32, bfloat16, float16"),
    (["--optimizer=sgd"], "--optimizer='sgd' is unknown"),
    (["--d_model=100"], "--d_model=100 is not divisible by --n_heads=8"),
    (["--batch_size=0"], "--batch_size=0 is invalid: expected a positive integer"),
    (["--dropout=1.5"], "the size flags give an invalid model: --dropout=1.5 is invalid"),
    (["--floor_hashes=2,4,16"], "--floor_hashes=2,4,16: expected exactly two values"),
])
def test_bad_flags_fail_before_compiling(monkeypatch, args, message):
    monkeypatch.setattr(memory, "measure", lambda *a, **k: pytest.fail("compiled despite a bad flag"))
    with pytest.raises(memory.FlagError) as err:
        parse(*args)
    assert message in str(err.value)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "x.json"
    output.write_json(str(path), [{"a": 1}])
    with pytest.raises(TypeError):
        output.write_json(str(path), [{"a": object()}])  # fails while serialising: the old file stays
    assert json.loads(path.read_text()) == [{"a": 1}]
    assert os.listdir(tmp_path) == ["x.json"]


def test_report_is_generated_from_the_results(results, tmp_path):
    from benchmarks import report

    path = tmp_path / "REPORT.md"
    text = report.build(results.out, str(path))
    assert path.read_text() == text
    assert "GPU: no results" in text and "`pytest`" in text
    for name in ("variants", "hashes", "layers", "seqlen", "timeline", "runtime"):
        assert f"/{name}.png)" in text
    with pytest.raises(SystemExit, match="missing results"):
        report.build(str(tmp_path), str(tmp_path / "R.md"))


@pytest.mark.long
def test_ordering_at_the_seed_setup(tmp_path):
    """The seed's setup itself (about a minute of compiles): Transformer above every other variant, Reformer least,
    its peak flat in hash rounds."""
    settings = dataclasses.replace(memory.Settings(), experiment="variants", out_dir=str(tmp_path), command="pytest")
    peak = {r["model"]: r["peak_bytes"] for r in memory.run(settings)["variants"]}
    assert all(peak["transformer"] > peak[m] for m in ("lsh", "reversible", "reformer")), peak
    assert peak["reformer"] == min(peak.values()), peak
    hashes = memory.run(dataclasses.replace(settings, experiment="hashes", hash_sweep=(2, 8)))["hashes"]
    assert hashes[1]["peak_bytes"] <= 1.01 * hashes[0]["peak_bytes"]
