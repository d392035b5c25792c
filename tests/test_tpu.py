"""TPU slices compiled on this CPU-only machine (libtpu's topologies): per-chip memory, HBM, refusals."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reformer_jax import ModelConfig

from reformer_jax.xla import tpu
from reformer_jax.memory import analyze_train_step

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=64, d_model=32, n_heads=2, d_ff=64, n_layers=1, max_len=128, chunk_len=16, n_hashes=1)
# Skipped where libtpu is not installed, except under CI (the environment variable CI=true), which installs it: there
# these tests run and fail, naming the pip command.
needs_libtpu = pytest.mark.skipif(not tpu.libtpu_available() and os.environ.get("CI") != "true",
                                  reason=f"libtpu is not installed ({tpu.LIBTPU_PIP})")


@pytest.mark.parametrize("name", ["v7:2x2", "v5e", "v5e:2", "tpu-v5e-16", "v5e:2x2x2x2"])
def test_unknown_topology_names_list_valid_examples(name):
    with pytest.raises(tpu.TopologyError) as error:
        tpu.topology_devices(name)
    assert f"topology={name} is not a TPU topology name" in str(error.value)
    assert "v5e:16x16" in str(error.value) and "\n" not in str(error.value)


def test_without_libtpu_the_error_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(tpu, "libtpu_available", lambda: False)
    with pytest.raises(tpu.TopologyError, match=r'topology=v5e:4x4 needs libtpu .*pip install "libtpu==0.0.42.\*"'):
        analyze_train_step(ModelConfig.preset("reformer", **TINY), batch_size=1, seq_len=128, topology="v5e:4x4")


def test_hbm_table_covers_every_generation_with_a_source():
    assert set(tpu.HBM_PER_CHIP) == {"v4", "v5e", "v5p", "v6e"}
    assert all(size >= 16 * 2**30 and source.startswith("https://cloud.google.com/tpu/docs/")
               for size, source in tpu.HBM_PER_CHIP.values())
    assert tpu.hbm_bytes("v5e:16x16") == 16 * 2**30 and tpu.chips("v4:4x4x4") == 64


@needs_libtpu
def test_per_chip_memory_falls_as_fsdp_grows():
    """One v5e chip, then a 4-chip slice with fsdp 4, then 4 chips with the parameters replicated (data 4)."""
    config = ModelConfig.preset("reformer", **TINY)
    one = analyze_train_step(config, batch_size=4, seq_len=128, topology="v5e:1x1")
    fsdp = analyze_train_step(config, batch_size=4, seq_len=128, topology="v5e:2x2", mesh="fsdp:4")
    data = analyze_train_step(config, batch_size=4, seq_len=128, topology="v5e:2x2", mesh="data:4")
    assert (one.backend, one.device_kind, one.device_count, one.topology) == ("tpu", "TPU v5 lite", 1, "v5e:1x1")
    assert (fsdp.device_count, fsdp.mesh_shape) == (4, "data:1,fsdp:4,tensor:1")
    assert fsdp.hbm_bytes == one.hbm_bytes == tpu.usable_hbm_bytes("v5e:2x2")
    assert fsdp.param_bytes < 0.5 * one.param_bytes and data.param_bytes == one.param_bytes
    assert fsdp.peak_bytes < data.peak_bytes < one.peak_bytes  # fsdp below data parallel, both below one chip
    assert one.fits and fsdp.fits
    # fits: the peak against the HBM the compiler lets a program use, up to the last byte
    assert dataclasses.replace(one, peak_bytes=one.hbm_bytes).fits
    assert not dataclasses.replace(one, peak_bytes=one.hbm_bytes + 1).fits


def _main(*args):
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "--d_model=32", "--n_heads=2", "--d_ff=64",
                             "--n_layers=1", "--chunk_len=16", "--n_hashes=1", "--batch_size=4", *args],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def test_compile_only_flags_are_refused_before_compiling():
    assert "--compile_only needs --topology=SLICE" in _main("--compile_only").stderr
    assert "--topology=v7:4x4 is not a TPU topology name" in _main("--compile_only", "--topology=v7:4x4").stderr


@needs_libtpu
def test_compile_only_refuses_a_mesh_that_does_not_fit_the_slice():
    wrong = _main("--seq_len=128", "--compile_only", "--topology=v5e:2x2", "--mesh=fsdp:8")
    assert wrong.returncode == 2 and "--mesh=fsdp:8 spans 8 devices but there are 4" in wrong.stderr
    assert "compiling for" not in wrong.stdout  # refused before the compile started


@needs_libtpu
@pytest.mark.long  # a TPU compilation in a fresh process, about 20 s on 2 cores
def test_compile_only_exits_0_when_it_fits():
    small = _main("--seq_len=128", "--compile_only", "--topology=v5e:2x2", "--mesh=fsdp:4")
    assert small.returncode == 0 and "4 x TPU v5 lite" in small.stdout and "fits:" in small.stdout, small.stderr


# One layer of full attention over 32768 tokens: its score matrices alone need more than a v5e chip's 16 GiB. The
# TPU compiler refuses the step in a few seconds (libtpu 0.0.42 refuses every program over the HBM it lets a program
# use, so a compiled step does not come back with fits False; the refusal is how a step too large is reported).
TOO_LARGE = dict(TINY, max_len=32768)


@needs_libtpu
def test_a_step_too_large_for_one_chip_is_refused_with_what_it_needs():
    with pytest.raises(Exception) as error:
        analyze_train_step(ModelConfig.preset("transformer", **TOO_LARGE), batch_size=1, seq_len=32768,
                           topology="v5e:1x1")
    refusal = tpu.hbm_refusal(error.value)
    assert refusal is not None, str(error.value)[:2000]
    assert refusal.available_bytes == tpu.usable_hbm_bytes("v5e:1x1")
    assert refusal.required_bytes > refusal.available_bytes


@needs_libtpu
def test_compile_only_exits_1_when_the_step_does_not_fit_the_slice():
    large = _main("--model=transformer", "--seq_len=32768", "--batch_size=1", "--compile_only",
                  "--topology=v5e:1x1")
    assert large.returncode == 1, large.stderr[-3000:]
    assert "compiling for v5e:1x1" in large.stdout and "does not fit" in large.stderr
    assert "fits:" not in large.stdout


def test_the_compilers_out_of_memory_figures_are_read():
    error = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                         "temporaries (23.78G) exceeds available HBM (15.75G).")
    refusal = tpu.hbm_refusal(error)
    assert refusal.what == "HLO temporaries"
    assert refusal.required_bytes == int(23.78 * 2**30) and refusal.available_bytes == int(15.75 * 2**30)
    other = tpu.hbm_refusal(RuntimeError(
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory in memory "
        "space hbm. Used 15.75G of 15.75G hbm. Exceeded hbm capacity by 6.01M."))
    assert other.available_bytes == int(15.75 * 2**30)
    assert other.required_bytes == int(15.75 * 2**30) + int(6.01 * 2**20)
    assert tpu.hbm_refusal(RuntimeError("INVALID_ARGUMENT: something else")) is None


@needs_libtpu
def test_two_core_chips_compile_as_one_device_each():
    """v4 and v5p chips have two TensorCores; pods run them as one device per chip (megacore)."""
    one = tpu.topology_devices("v4:1x1x1")
    assert len(one) == 1 and one[0].device_kind == "TPU v4"
    assert len(tpu.topology_devices("v5p:2x2x1")) == 4


@needs_libtpu
@pytest.mark.parametrize("generation", ["v4:1x1x1", "v5e:1x1", "v5p:1x1x1", "v6e:1x1"])
def test_usable_hbm_is_the_compilers_own_figure(generation):
    """libtpu lets a program use a little under each chip's nominal HBM (v5e: 15.75 of 16 GiB)."""
    usable = tpu.usable_hbm_bytes(generation)
    assert 0.9 * tpu.hbm_bytes(generation) < usable < 1.05 * tpu.hbm_bytes(generation)
    assert usable == tpu.usable_hbm_bytes(generation.split(":")[0] + (":4x4" if generation.count("x") == 1 else ":2x2x4"))


# --- the TPU experiment of the memory driver (benchmarks/tpu_memory.py) ------------------------------------------

DRIVER_SIZES = ["--d_model=32", "--n_heads=2", "--d_ff=64", "--n_layers=1", "--chunk_len=16", "--n_hashes=1",
                "--vocab_size=64", "--seq_len=128"]


def _driver_settings(*args):
    from absl import flags

    from benchmarks import memory

    fv = flags.FlagValues()
    memory.define_flags(fv)
    argv = ["prog", "--experiment=tpu", *args]
    fv(argv)
    return memory.settings_from_flags(fv, argv)


@pytest.mark.parametrize("args, message", [
    (["--topologies=v5e:2x2"], "--topologies=v5e:2x2 has 4 chips; its part compiles for one chip: e.g. v5e:1x1"),
    (["--topologies=v7:1x1"], "--topologies=v7:1x1 is not a TPU topology name"),
    (["--tpu_fsdp_slices=v5e:3"], "--tpu_fsdp_slices=v5e:3 is not a TPU topology name"),
    (["--tpu_parts=seed,fastest"], "--tpu_parts=seed,fastest: unknown 'fastest'; expected a comma-separated subset"),
    (["--tpu_dtypes=fp8"], "--tpu_dtypes=fp8: unknown 'fp8'"),
    (["--tpu_max_length=100000"], "--tpu_max_length=100000 is invalid: expected a power of two >= --seq_len=4096"),
])
def test_tpu_experiment_flags_refused_before_compiling(args, message):
    from benchmarks import memory

    with pytest.raises(memory.FlagError) as error:
        _driver_settings(*args)
    assert message in str(error.value) and "\n" not in str(error.value)


@needs_libtpu
@pytest.mark.long  # eleven TPU compilations, about a minute on 2 cores
def test_tpu_experiment_writes_each_part_and_merges_reruns(tmp_path):
    """Tiny sizes: the seed part on one chip; the longest part on one chip and with fsdp over a 4-chip slice (every
    length up to --tpu_max_length fits, so the search must climb to it); the long part; a rerun of one slice keeps
    the other rows."""
    import dataclasses

    from benchmarks import memory
    from benchmarks.output import read_json

    out = str(tmp_path)
    common = [*DRIVER_SIZES, f"--out_dir={out}", "--models=reformer", "--tpu_dtypes=float32"]
    settings = _driver_settings(*common, "--tpu_parts=seed,longest,long", "--topologies=v5e:1x1",
                                "--tpu_fsdp_slices=v5e:2x2", "--tpu_long_slice=v5e:2x2", "--floor_long_len=512",
                                "--tpu_max_length=2048")
    memory.run(settings)
    seed_rows = read_json(os.path.join(out, "tpu.json"))
    assert [(r["model"], r["topology"], r["tpu_device_kind"], r["fits"]) for r in seed_rows] == [
        ("reformer", "v5e:1x1", "TPU v5 lite", True)]
    assert seed_rows[0]["tpu_peak_mib"] > 0 and seed_rows[0]["cpu_peak_mib"] > 0
    assert "--topologies=v5e:1x1" in seed_rows[0]["row_command"] and "--tpu_parts=seed" in seed_rows[0]["row_command"]
    longest = {r["mesh"]: r for r in read_json(os.path.join(out, "tpu_longest.json"))}
    assert set(longest) == {"one chip", "fsdp:4"} and longest["fsdp:4"]["batch_size"] == 4
    for row in longest.values():  # LSH: 32-chunk steps (512 tokens), from the first step up to --tpu_max_length
        assert row["step"] == 512 and row["probe_lengths"][0] == 512 and all(row["probe_fits"])
        assert row["power_of_two"] == row["longest"] == 2048 and row["first_refused"] is None
    (long_row,) = read_json(os.path.join(out, "tpu_long.json"))
    assert (long_row["seq_len"], long_row["mesh"], long_row["batch_size"], long_row["fits"]) == (512, "fsdp:4", 4, True)
    for name in ("tpu", "tpu_longest", "tpu_long"):
        assert os.path.exists(os.path.join(out, name + ".md")) and os.path.exists(os.path.join(out, name + ".csv"))
    assert os.path.exists(os.path.join(out, "tpu.png")) and os.path.exists(os.path.join(out, "tpu_longest.png"))
    # Rerun the seed part on another chip: the v5e row stays.
    memory.run(dataclasses.replace(settings, tpu_parts=("seed",), topologies=("v6e:1x1",)))
    assert [r["topology"] for r in read_json(os.path.join(out, "tpu.json"))] == ["v5e:1x1", "v6e:1x1"]


def test_longest_search_steps_where_the_default_bucket_count_splits():
    """LSH variants search on multiples of 32 chunks, where 2 x length / chunk always splits into two even factors
    (memory grows smoothly there); full attention on multiples of the chunk."""
    from benchmarks import memory, tpu_memory
    from reformer_jax.model.config import default_n_buckets

    settings = memory.Settings()
    assert tpu_memory.search_step(settings, "transformer") == tpu_memory.search_step(settings, "reversible") == 64
    assert tpu_memory.search_step(settings, "lsh") == tpu_memory.search_step(settings, "reformer") == 2048
    for length in range(2048 * 200, 2048 * 300, 2048):  # every multiple of the step splits, none of them badly
        f1, f2 = default_n_buckets(length, 64)
        assert f1 * f2 == length // 32 and min(f1, f2) >= 32
    assert isinstance(default_n_buckets(2048 * 200 + 64, 64), int)  # an odd multiple of the chunk: no split
