"""TPU slices compiled on this CPU-only machine (libtpu's topologies): per-chip memory, HBM, refusals."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reformer_jax import ModelConfig

from reformer_jax.xla import tpu
from reformer_jax.xla.memory_analysis import analyze_train_step

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=64, d_model=32, n_heads=2, d_ff=64, n_layers=1, max_len=128, chunk_len=16, n_hashes=1)
needs_libtpu = pytest.mark.skipif(not tpu.libtpu_available(),
                                  reason=f"libtpu is not installed ({tpu.LIBTPU_PIP})")


@pytest.mark.parametrize("name", ["v7:2x2", "v5e", "v5e:2", "tpu-v5e-16", "v5e:2x2x2x2"])
def test_unknown_topology_names_list_valid_examples(name):
    with pytest.raises(tpu.TopologyError) as error:
        tpu.topology_devices(name)
    assert f"--topology={name} is not a TPU topology name" in str(error.value)
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
    assert (fsdp.device_count, fsdp.mesh_shape, fsdp.hbm_bytes) == (4, "data:1,fsdp:4,tensor:1", 16 * 2**30)
    assert fsdp.param_bytes < 0.5 * one.param_bytes and data.param_bytes == one.param_bytes
    assert fsdp.peak_bytes < data.peak_bytes < one.peak_bytes  # fsdp below data parallel, both below one chip
    assert one.fits and fsdp.fits


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
@pytest.mark.long  # three TPU compilations in fresh processes, about a minute on 2 cores
def test_compile_only_exits_0_when_it_fits_and_1_when_it_does_not():
    small = _main("--seq_len=128", "--compile_only", "--topology=v5e:2x2", "--mesh=fsdp:4")
    assert small.returncode == 0 and "4 x TPU v5 lite" in small.stdout and "fits:" in small.stdout, small.stderr
    wrong = _main("--seq_len=128", "--compile_only", "--topology=v5e:2x2", "--mesh=fsdp:8")
    assert wrong.returncode != 0 and "--mesh=fsdp:8 spans 8 devices but there are 4" in wrong.stderr
    # Full attention over 32768 tokens: the score matrices alone exceed a v5e chip's 16 GiB.
    large = _main("--model=transformer", "--seq_len=32768", "--batch_size=1", "--compile_only",
                  "--topology=v5e:1x1")
    assert large.returncode == 1 and "does not fit" in large.stderr
