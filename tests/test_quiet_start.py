"""A CPU start of the command lines says nothing about TPUs: with libtpu installed (the `tpu` extra, as in CI) and
no TPU chips, jax would probe for them when it starts its backends and print the probe's failure on stderr
(`reformer_jax.cli.quiet_absent_tpu` tells it not to). Each start here runs without JAX_PLATFORMS (which the rest
of the suite sets), and reaches jax's backends: the same start with the quieting switched off prints the probe."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from reformer_jax import ModelConfig, tokenizers
from reformer_jax.model.hf_convert import save_converted
from reformer_jax.model.reformer_lm import init_params
from reformer_jax.xla import tpu

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not tpu.libtpu_available() and os.environ.get("CI") != "true",
                                reason=f"libtpu is not installed ({tpu.LIBTPU_PIP}): jax has no TPU probe to print")
# What libtpu's failed probe prints (its first line, its logging preamble, jax's notice of the failed backend).
PROBE_MARKS = ("TPU", "libtpu", "InitGoogle")


def _start(args, tmp_path, quiet=True):
    """Run `python ARGS...` (a script or -m module) from the repository without JAX_PLATFORMS; quiet=False first
    replaces cli.quiet_absent_tpu with a no-op. -> (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    if not quiet:
        target = ("path", args[0]) if args[0].endswith(".py") else ("module", args[1])
        rest = args[1:] if target[0] == "path" else args[2:]
        args = ["-c", "import runpy, sys\nfrom reformer_jax import cli\ncli.quiet_absent_tpu = lambda: None\n"
                f"sys.argv = [{target[1]!r}] + {rest!r}\nrunpy.run_{target[0]}({target[1]!r}, run_name='__main__')"]
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def _probe_lines(text):
    return [line for line in text.splitlines() if any(mark in line for mark in PROBE_MARKS)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny full-attention model saved as a converted checkpoint: what generate and evaluate --init_from read."""
    config = ModelConfig.preset("transformer", d_model=16, n_heads=2, d_ff=32, n_layers=1, max_len=64, dropout=0.0)
    out = tmp_path_factory.mktemp("quiet") / "model"
    save_converted(config, init_params(config, jax.random.key(0)), out, tokenizer=tokenizers.BYTES)
    return out


def test_main_py_starts_its_backends_without_a_tpu_line(tmp_path):
    # A mesh larger than the devices is refused once jax has counted them, before anything compiles.
    args = ["main.py", "--mesh=data:3", f"--workdir={tmp_path / 'run'}"]
    code, out, err = _start(args, tmp_path)
    assert (code, out, err) == (2, "", "error: --mesh=data:3 spans 3 devices but there are 1; make the sizes "
                                       "multiply to 1 (or let one axis be -1).\n")
    assert _probe_lines(_start(args, tmp_path, quiet=False)[2]), "the start no longer reaches jax's backends"


def test_generate_and_evaluate_start_without_a_tpu_line(tmp_path, converted):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    for args in (["-m", "reformer_jax.generate", f"--init_from={converted}", "--prompt=To", "--max_new_tokens=2"],
                 ["-m", "reformer_jax.evaluate", f"--init_from={converted}", f"--data_path={text}"]):
        code, out, err = _start(args, tmp_path)
        assert code == 0 and out, (args, err)
        assert _probe_lines(err) == [], (args, err)
        assert _probe_lines(_start(args, tmp_path, quiet=False)[2]), f"{args[1]} no longer reaches jax's backends"


def test_a_benchmark_driver_starts_without_a_tpu_line(tmp_path):
    args = ["-m", "benchmarks.memory", "--experiment=variants", "--models=transformer", "--seq_len=64",
            "--n_layers=1", "--d_model=16", "--d_ff=32", "--n_heads=2", f"--out_dir={tmp_path}"]
    code, out, err = _start(args, tmp_path)
    assert code == 0 and "1 rows" in out + err, err
    assert _probe_lines(err) == [], err
    assert _probe_lines(_start(args, tmp_path, quiet=False)[2]), "the driver no longer reaches jax's backends"
