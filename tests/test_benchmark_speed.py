"""The speed driver at tiny sizes: its worker protocol, the peers' training steps, the side-by-side run and its
files, the length sweep's stopping rule, flag checks, and the persistent compilation cache across processes.

No timing is asserted: only that steps were timed, losses are finite and the figures are put together correctly.
"""

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from absl import flags

from benchmarks import peers, speed, speed_worker, targets
from reformer_jax.model import flops

TINY = speed.Settings(vocab_size=32, d_model=32, n_heads=2, d_ff=64, n_layers=1, seq_len=32, n_hashes=2,
                      chunk_len=16, ours=("default",), warmup_steps=0, rounds=2, sweep_rounds=1, fast_compile=True,
                      command="pytest")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _messages(text):
    return [speed_worker.parse_line(line) for line in text.splitlines() if line.startswith(speed_worker.PREFIX)]


def test_worker_protocol_times_on_command_and_refuses_unknown_ones(capsys, monkeypatch):
    losses = iter([3.0, 2.5, 2.0])
    monkeypatch.setattr(speed_worker, "build_ours", lambda spec: (lambda: next(losses), {"compile_s": 1.5}))
    spec = {"impl": "ours", "warmup_steps": 1}
    assert speed_worker.serve(spec, commands=io.StringIO("run 2\nquit\n")) == 0
    messages = _messages(capsys.readouterr().out)
    assert [k for k, _ in messages] == ["READY", "TIMES", "DONE"]
    assert messages[0][1]["compile_s"] == 1.5 and len(messages[0][1]["warmup_s"]) == 1
    assert len(messages[1][1]["step_s"]) == 2 and messages[1][1]["loss"] == 2.0
    assert messages[2][1]["ru_maxrss_bytes"] > 0
    losses = iter([1.0])
    assert speed_worker.serve(spec, commands=io.StringIO("walk 3\n")) == 2
    kind, payload = _messages(capsys.readouterr().out)[-1]
    assert kind == "ERROR" and "expected 'run N', 'profile N' (our step only) or 'quit'" in payload["message"]


def test_worker_compiles_our_step_and_skips_it_when_it_does_not_fit(capsys):
    spec = speed.ours_spec(TINY, "transformer", TINY.seq_len, "default", memory_limit=1)
    assert speed_worker.serve(spec, commands=io.StringIO("run 1\n")) == 0
    (kind, payload), = _messages(capsys.readouterr().out)
    assert kind == "SKIP" and "exceeds the limit" in payload["reason"]
    assert payload["compile_peak_bytes"] > 1 and payload["compile_s"] > 0 and payload["param_count"] > 0


@pytest.mark.long
@pytest.mark.parametrize("peer", peers.PEERS)
def test_peer_step_trains_the_same_batch(peer):
    if peers.missing_packages(peer):
        pytest.skip(f"{peer} not installed")
    import torch

    spec = speed.peer_spec(TINY, peer, TINY.seq_len)
    step = peers.build(peer, spec["sizes"], speed_worker.tokens_for(spec))
    before = [p.detach().clone() for p in step.model.parameters()]
    losses = [step() for _ in range(3)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert any(not torch.equal(a, b) for a, b in zip(before, step.model.parameters()))
    # Near log(vocab) at initialisation: the loss is a next-token cross-entropy over the tiny vocabulary.
    assert abs(losses[0] - math.log(TINY.vocab_size)) < 1.0, losses


def test_missing_peers_are_skipped_with_a_message(monkeypatch):
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None if name == "transformers" else object())
    available, notes = speed.available_peers()
    assert available == ["reformer_pytorch"]
    assert notes == ["Hugging Face ReformerModelWithLMHead skipped: transformers not installed "
                     "(pip install -r benchmarks/requirements-peers.txt)."]


# The default run times reformer_pytorch beside ours (Hugging Face's import alone takes ~5 s of CPU: slow run).
@pytest.mark.parametrize("peer", [pytest.param("reformer_pytorch"), pytest.param("hf", marks=pytest.mark.long)])
def test_side_by_side_run_writes_rows_and_files(tmp_path, monkeypatch, peer):
    if peers.missing_packages(peer):
        pytest.skip(f"{peer} not installed")
    real_missing = peers.missing_packages
    monkeypatch.setattr(peers, "missing_packages", lambda p: real_missing(p) if p == peer else ["(left out)"])
    settings = dataclasses.replace(TINY, compare="peers", out_dir=str(tmp_path), rounds=1)
    rows = speed.run(settings)
    names = [r["implementation"] for r in rows]
    assert names == ["ours", peer]
    for row in rows:
        assert len(row["step_s"]) == settings.rounds * settings.steps_per_round
        assert row["median_step_s"] == float(np.median(row["step_s"])) > 0
        assert row["tokens_per_s"] == pytest.approx(settings.batch_size * settings.seq_len / row["median_step_s"])
        assert row["peak_rss_bytes"] > 0 and math.isfinite(row["last_loss"]) and row["param_count"] > 0
        assert row["backend"] == "cpu" and row["jax_version"] and row["command"] == "pytest"
    assert rows[0]["compile_s"] > 0 and rows[0]["compile_peak_bytes"] > 0 and rows[0]["config"]["dropout"] == 0
    if "hf" in names:
        hf = rows[names.index("hf")]
        assert hf["hf_over_this_step"] == 1.0 and hf["rss_over_hf"] == 1.0 and hf["transformers_version"]
        assert rows[0]["hf_over_this_step"] == pytest.approx(hf["median_step_s"] / rows[0]["median_step_s"])
    if "reformer_pytorch" in names:
        assert rows[names.index("reformer_pytorch")]["reformer_pytorch_version"]
    # The roofline: the model's FLOPs (the same for the peer), and a dense matmul rate measured in this run.
    step_flops = flops.train_step_flops(settings.config("reformer", settings.seq_len), 1, settings.seq_len).total
    rate = max(p["flops_per_s"] for p in rows[0]["matmul_probes"])
    assert {(p["m"], p["options"]) for p in rows[0]["matmul_probes"]} == {(32, "step"), (32, "xla")}
    for row in rows:
        assert row["step_gflop"] == step_flops / 1e9 and row["matmul_gflops_per_s"] == rate / 1e9 > 0
        assert row["gflops_per_s"] == pytest.approx(step_flops / 1e9 / row["median_step_s"])
        assert row["roofline_fraction"] == pytest.approx(step_flops / row["median_step_s"] / rate)
    with open(tmp_path / "speed_peers.json") as f:
        assert json.load(f) == json.loads(json.dumps(rows))
    markdown = (tmp_path / "speed_peers.md").read_text()
    assert "| reformer_jax (reformer) |" in markdown and "skipped: (left out) not installed" in markdown
    assert f"in this run at the step's shapes: float32 {rate / 1e9:.1f} GFLOP/s" in markdown
    assert (tmp_path / "speed_peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "speed_peers.csv").exists()


class FakeWorker:
    """Stands in for a worker process: lengths above 64 do not fit; a step costs 1 ms per 64 tokens."""

    def __init__(self, name, spec):
        self.name, self.spec, self.facts, self.step_s, self.skipped = name, spec, {}, [], None

    def wait_ready(self):
        self.facts.update(compile_s=0.5, compile_peak_bytes=self.spec["seq_len"] * 1000)
        assert self.spec["memory_limit_bytes"] > 0
        if self.spec["seq_len"] > 64 and self.name == "transformer":
            self.skipped = "compile-time peak exceeds the limit"

    def run_round(self, steps):
        self.step_s.extend([self.spec["seq_len"] / 64 * 1e-3] * steps)

    def finish(self):
        self.facts.setdefault("ru_maxrss_bytes", 123 * 2**20)

    def kill(self):
        pass


def test_length_sweep_stops_a_variant_once_it_no_longer_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "Worker", FakeWorker)
    settings = dataclasses.replace(TINY, sweep="length", models=("transformer", "reformer"), lengths=(32, 64, 128, 256),
                                   out_dir=str(tmp_path))
    rows = speed.run(settings)
    seen = [(r["model"], r["seq_len"], r["skipped"] is not None) for r in rows]
    assert seen == [("transformer", 32, False), ("reformer", 32, False), ("transformer", 64, False),
                    ("reformer", 64, False), ("transformer", 128, True), ("reformer", 128, False),
                    ("reformer", 256, False)]
    timed = [r for r in rows if not r["skipped"]]
    assert all(r["s_per_token"] == pytest.approx(1e-3 / 64 / settings.batch_size) for r in timed)
    assert all(r["s_per_token_over_shortest"] == pytest.approx(1.0) for r in timed)
    assert (tmp_path / "speed_length.md").read_text().count("\n| ") == len(rows) + 2  # + header and rule
    assert (tmp_path / "speed_length.png").exists()
    # --merge: time one cell again (another command); every other row of the first run stays as it was.
    again = dataclasses.replace(settings, models=("transformer",), lengths=(128,), merge=True,
                                command="python -m benchmarks.speed --merge")
    merged = speed.run(again)
    assert [(r["model"], r["seq_len"]) for r in merged] == [(m, n) for m, n, _ in seen]
    assert [r["command"] for r in merged].count("python -m benchmarks.speed --merge") == 1
    assert {k: v for k, v in merged[0].items() if k != "s_per_token_over_shortest"} == {
        k: v for k, v in rows[0].items() if k != "s_per_token_over_shortest"}
    header = (tmp_path / "speed_length.md").read_text().splitlines()[2]
    assert header.startswith("Commands (each row records its own): `") and "--merge`" in header


@pytest.fixture
def flag_values():
    fv = flags.FlagValues()
    speed.define_flags(fv)
    return fv


@pytest.mark.parametrize("args, expected", [
    (["--compare=torch"], "--compare='torch' is unknown; expected one of none, peers"),
    (["--sweep=width"], "--sweep='width' is unknown"),
    (["--ours=default,fp8"], "--ours=default,fp8: unknown 'fp8'; expected a comma-separated subset of default,"),
    (["--models=reformer,gpt"], "--models=reformer,gpt: unknown 'gpt'"),
    (["--lengths=1024,x"], "'x' is not an integer"),
    (["--rounds=0"], "--rounds=0 is invalid: expected a positive integer"),
    (["--warmup_steps=-1"], "--warmup_steps=-1 is invalid"),
    (["--memory_fraction=1.5"], "--memory_fraction=1.5 is invalid"),
    (["--seq_len=1000"], "length 1000 is not a multiple of --chunk_len=64"),
    (["--sweep=length", "--lengths=1024,1000"], "length 1000 is not a multiple"),
    (["--compare=peers", "--sweep=length"], "separate runs"),
    (["--merge"], "--merge keeps rows of a --sweep=length run"),
    (["--profile", "--compare=peers"], "--profile profiles our step alone"),
    (["--profile", "--profile_steps=0"], "--profile_steps=0 is invalid"),
    (["--compare=peers", "--d_ff=1000"], "--d_ff=1000 must be a multiple of --d_model=256"),
    (["--d_model=102"], "d_model=102 is not divisible by n_heads=4"),
])
def test_bad_flags_are_refused_before_compiling(flag_values, args, expected):
    flag_values(["speed", *args])
    with pytest.raises(speed.FlagError) as err:
        speed.settings_from_flags(flag_values, ["speed", *args])
    assert expected in str(err.value)


def test_defaults_are_configuration_p(flag_values):
    flag_values(["speed"])
    s = speed.settings_from_flags(flag_values, ["speed"])
    config = s.config("reformer", s.seq_len)
    assert (config.vocab_size, config.d_model, config.n_heads, config.d_head, config.d_ff, config.n_layers,
            s.seq_len, s.batch_size, config.n_hashes, config.chunk_len) == (259, 256, 4, 64, 1024, 6, 4096, 1, 8, 64)
    assert config.dropout == 0 and s.peer_sizes(s.seq_len)["n_buckets"] == config.resolved_n_buckets(4096) == 128


def test_bad_cache_dir_is_refused(tmp_path, flag_values):
    from reformer_jax.xla.compilation_cache import check_cache_dir

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_cache_dir(str(a_file))
    flag_values(["speed", f"--compilation_cache_dir={a_file}"])
    with pytest.raises(speed.FlagError, match="--compilation_cache_dir=.* is a file"):
        speed.settings_from_flags(flag_values)
    assert check_cache_dir(str(tmp_path / "new" / "dir")) == str(tmp_path / "new" / "dir")


def test_a_second_process_loads_from_the_compilation_cache(tmp_path):
    script = textwrap.dedent("""
        import sys
        import jax, jax.numpy as jnp
        from reformer_jax.xla.compilation_cache import CacheHits, enable_compilation_cache
        enable_compilation_cache(sys.argv[1], min_compile_time_s=0)
        with CacheHits() as hits:
            jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((4, 4))))
        print("HITS", hits.count)
    """)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    hits = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        hits.append(int(proc.stdout.split("HITS")[-1]))
    assert hits[0] == 0 and hits[1] >= 1, hits
    assert os.listdir(tmp_path / "cache")


def test_main_refuses_a_cache_dir_that_is_a_file(tmp_path):
    from absl import app

    import main

    a_file = tmp_path / "cache"
    a_file.write_text("x")
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["main.py", f"--compilation_cache_dir={a_file}"])
        with pytest.raises(app.UsageError, match="--compilation_cache_dir=.* is a file, not a directory"):
            main.validate_run_flags()
    finally:
        flags.FLAGS.unparse_flags()


def _speed_row(impl, step_s, rss_mib, label=None):
    return {"implementation": impl, "label": label or impl, "median_step_s": step_s,
            "peak_rss_bytes": int(rss_mib * 2**20)}


def test_peer_targets_are_judged_from_the_rows():
    rows = [{**_speed_row("ours", 4.0, 600.0, "reformer_jax (reformer)"), "roofline_fraction": 0.72},
            _speed_row("ours_lean_compile", 3.0, 400.0, "reformer_jax (reformer, lean_compile)"),
            _speed_row("hf", 20.0, 1000.0), _speed_row("reformer_pytorch", 22.0, 1100.0)]
    default, lean = targets.peer_target_lines(rows)
    assert default.startswith("reformer_jax (reformer): step 4.00 s, 5.00 x faster than Hugging Face's, 5.50 x")
    assert ("reformer-pytorch: met); 0.72 of the matmul rate (target >= 0.7: met); peak RSS 600.0 MiB = 0.60 x "
            "HF's (target <= 0.5: NOT met)") in default
    assert "6.67 x faster" in lean and "0.40 x HF's (target <= 0.5: met)" in lean and "matmul rate" not in lean
    assert "(target >= 0.7: NOT met)" in targets.peer_target_lines([{**rows[0], "roofline_fraction": 0.69},
                                                                    rows[2]])[0]
    assert targets.peer_target_lines(rows[:2]) == ["Hugging Face was not timed in this run: targets 1 and 2 cannot "
                                                 "be judged."]
    # HF's rounds drift (15, 20, 25 s): same-round ratios 3.75, 5 and 6.25, median 5: met on both measures.
    drift = [{**rows[0], "step_s": [4.0, 4.0, 4.0]}, {**rows[2], "step_s": [15.0, 20.0, 25.0]}, rows[3]]
    line = targets.peer_target_lines(drift)[0]
    assert "5.00 x faster than Hugging Face's, 5.50 x reformer-pytorch's; round by round 5.00 x" in line
    assert "(target >= 5 x HF and faster than reformer-pytorch: met)" in line
    drift[0]["step_s"] = [6.0, 4.0, 3.0]  # median 4 s, but each round only 2.5, 5.0 and 8.33 x: median 5.0
    assert "round by round 5.00 x (median of 3 same-round ratios, 2.50 to 8.33)" in targets.peer_target_lines(drift)[0]
    drift[0]["step_s"] = [4.0, 6.0, 3.0]  # median 4 s again; same-round ratios 3.75, 3.33 and 8.33: median 3.75
    line = targets.peer_target_lines(drift)[0]
    assert "round by round 3.75 x" in line and "reformer-pytorch: NOT met" in line
    assert targets.paired_speedups({"step_s": [1.0]}, {"step_s": [1.0, 2.0]}) == []  # unpaired counts: no ratios
    low = {**_speed_row("ours_bfloat16", 3.5, 550.0), "last_loss": 5.05}
    lines = targets.peer_target_lines([{**rows[0], "last_loss": 5.0}, low, rows[2]])
    assert lines[-1] == ("bfloat16 compute (float32 parameters and residual streams): step 3.50 s against 4.00 s in "
                         "float32; after the same warm-up and timed steps on the same batch the loss is 5.0500 "
                         "against 5.0000 (+1.00%).")


def test_length_targets_are_judged_from_the_rows():
    def row(model, length, step_s):
        return {"model": model, "seq_len": length, "median_step_s": step_s, "s_per_token": step_s / length}

    rows = [row("reformer", 4096, 4.0), row("reformer", 65536, 80.0), row("reversible", 4096, 5.0),
            row("reversible", 8192, 20.0), row("reformer", 8192, 8.0), row("reversible", 16384, 80.0),
            row("reformer", 16384, 16.0), {"model": "reversible", "seq_len": 32768, "median_step_s": None}]
    lines = targets.length_target_lines(rows)
    assert lines[0] == "Reformer seconds per token at 65536 / at 4096: 1.25 (target <= 1.3 at 65536: met)."
    assert "Reversible LM seconds per token at 16384 / at 4096: 4.00." in lines
    assert "Length 8192: Reformer 2.50 x faster than the Reversible LM (target >= 1 x: met)." in lines
    assert "Length 16384: Reformer 5.00 x faster than the Reversible LM (target >= 2 x: met)." in lines
    short = targets.length_target_lines([row("reformer", 4096, 4.0), row("reformer", 8192, 9.0)])
    assert "(target <= 1.3 at 65536: NOT met) (65536 not timed" in short[0]
    assert short[-1].startswith("Reformer and Reversible LM not both timed at 16384")


def test_linearity_times_every_length_in_the_same_rounds(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "Worker", FakeWorker)
    groups, real_time_group = [], speed.time_group

    def recording(workers, *args, **kwargs):
        groups.append([w.spec["seq_len"] for w in workers])
        return real_time_group(workers, *args, **kwargs)

    monkeypatch.setattr(speed, "time_group", recording)
    settings = dataclasses.replace(TINY, sweep="linearity", models=("reformer",), lengths=(64, 32, 128),
                                   sweep_rounds=3, out_dir=str(tmp_path))
    rows = speed.run(settings)
    assert groups == [[32, 64, 128]]  # one group: every length alive together, timed in the same rounds
    assert [(r["model"], r["seq_len"], len(r["step_s"])) for r in rows] == [
        ("reformer", 32, 3), ("reformer", 64, 3), ("reformer", 128, 3)]
    assert all(r["experiment"] == "linearity" for r in rows)
    assert (tmp_path / "speed_linearity.md").read_text().startswith("# Training speed against length, every length")
    assert (tmp_path / "speed_linearity.png").exists() and not (tmp_path / "speed_length.json").exists()


def _reformer_row(seq_len, step_s):
    return {"model": "reformer", "seq_len": seq_len, "batch_size": 1, "step_s": step_s,
            "median_step_s": float(np.median(step_s)), "s_per_token": float(np.median(step_s)) / seq_len}


def test_linearity_target_needs_both_the_medians_and_the_rounds():
    steady = [_reformer_row(4096, [4.0, 4.0, 4.0]), _reformer_row(65536, [80.0, 80.0, 80.0])]  # 1.25 both ways
    (line,) = targets.linearity_target_lines(steady)
    assert "1.25 by medians, round by round 1.25" in line and "met" in line and "NOT met" not in line
    # The medians pass (80 s over 4 s) but two of three rounds do not (26.7 and 22.4 x for 16 x the tokens).
    drifting = [_reformer_row(4096, [4.0, 3.0, 5.0]), _reformer_row(65536, [60.0, 80.0, 112.0])]
    (line,) = targets.linearity_target_lines(drifting)
    assert "1.25 by medians" in line and "round by round 1.40" in line and "NOT met" in line
    short = [_reformer_row(4096, [4.0]), _reformer_row(32768, [36.0])]
    (line,) = targets.linearity_target_lines(short)
    assert "65536 not timed" in line and "NOT met" in line
    assert "cannot be judged" in targets.linearity_target_lines([_reformer_row(65536, [80.0])])[0]
