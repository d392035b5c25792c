"""python -m reformer_jax.evaluate reports memory: the evaluation step's compile-time peak (XLA's memory analysis) and
the process's peak RSS, printed and kept in the entry; --topology compiles the step for one TPU chip instead
(libtpu), and a bad slice, a missing libtpu or a bad --seq_len is one line before anything compiles."""

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from reformer_jax.evaluate import evaluate_run
from reformer_jax.model.hf_convert import config_from_hf, save_converted, tokenizer_for_hf
from reformer_jax.model.reformer_lm import init_params
from reformer_jax.training.saved_run import SavedRunError, abstract_params
from reformer_jax.xla import tpu
from reformer_jax.xla.memory_analysis import tree_bytes

REPO = Path(__file__).resolve().parents[1]
# A Hugging Face layer mix at toy sizes with enwik8's byte vocabulary (258: a text tokenizer, byte b = token b + 2).
TINY_HF = dict(attn_layers=["local", "lsh"], hidden_size=16, num_attention_heads=2, attention_head_size=8,
               feed_forward_size=32, vocab_size=258, lsh_attn_chunk_length=16, local_attn_chunk_length=16,
               lsh_num_chunks_before=1, local_num_chunks_before=1, num_hashes=2, num_buckets=4, is_decoder=True,
               axial_pos_embds=True, axial_pos_shape=[8, 16], axial_pos_embds_dim=[8, 8], max_position_embeddings=128,
               hidden_act="relu", pad_token_id=0)
SEQ_LEN = 64
needs_libtpu = pytest.mark.skipif(not tpu.libtpu_available() and os.environ.get("CI") != "true",
                                  reason=f"libtpu is not installed ({tpu.LIBTPU_PIP})")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(a converted checkpoint, a 285-byte text: four windows of 64 targets and a fifth, padded one)."""
    root = tmp_path_factory.mktemp("evaluate_memory")
    config = config_from_hf(TINY_HF)
    save_converted(config, init_params(config, jax.random.key(0)), root / "tiny", tokenizer_for_hf(TINY_HF))
    (root / "text.txt").write_bytes(bytes(range(32, 127)) * 3)
    return root / "tiny", root / "text.txt"


def _evaluate(*flags: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = (f"import runpy, sys\n{prelude}\nsys.argv = ['evaluate', *{list(flags)!r}]\n"
            "runpy.run_module('reformer_jax.evaluate', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_the_entry_holds_the_step_peak_and_the_process_peak_rss(converted):
    model, text = converted
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    entry = evaluate_run(str(model), data_path=str(text), seq_len=SEQ_LEN, flag="--init_from")
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    memory = entry["memory"]
    assert entry["tokens"] == len(text.read_bytes()) - 1  # every target, the last window padded and masked
    assert memory["eval_step_peak_bytes"] == (memory["argument_bytes"] + memory["output_bytes"]
                                              - memory["alias_bytes"] + memory["temp_bytes"])
    assert memory["param_bytes"] == tree_bytes(abstract_params(config_from_hf(TINY_HF)))
    assert memory["batch_bytes"] == 3 * 4 * SEQ_LEN  # one full window: inputs, targets (int32), weights (float32)
    assert memory["argument_bytes"] >= memory["param_bytes"] + memory["batch_bytes"]
    assert memory["backend"] == "cpu" and memory["temp_bytes"] > 0
    assert rss_before <= memory["peak_rss_bytes"] <= rss_after
    assert entry["seconds"]["compile"] > 0 and entry["seconds"]["score"] > 0

    # The command line prints the same compile-time figure (the same program) and the process's own peak RSS.
    result = _evaluate(f"--init_from={model}", f"--data_path={text}", f"--seq_len={SEQ_LEN}")
    assert result.returncode == 0, result.stderr
    printed = re.search(r"memory: evaluation step peak ([\d,.]+) MiB at compile time \(XLA: argument .*\); process "
                        r"peak RSS ([\d,.]+) MiB; compiled in [\d.]+ s, scored in [\d.]+ s", result.stdout)
    assert printed, result.stdout
    assert printed.group(1) == f"{memory['eval_step_peak_bytes'] / 2**20:,.1f}"
    assert float(printed.group(2).replace(",", "")) * 2**20 > memory["param_bytes"]


def test_a_bad_slice_is_one_line_before_the_checkpoint_is_opened():
    result = _evaluate("--init_from=/nonexistent", "--data_path=/nonexistent", "--topology=v7:1x1")
    assert result.returncode == 2
    assert _error_line(result).startswith("error: --topology=v7:1x1 is not a TPU topology name; expected")


def test_without_libtpu_topology_says_so_in_one_line_and_exits_1():
    result = _evaluate("--init_from=/nonexistent", "--data_path=/nonexistent", "--topology=v5e:1x1",
                       prelude="from reformer_jax.xla import tpu\ntpu.libtpu_available = lambda: False")
    assert result.returncode == 1
    assert re.fullmatch(r'error: --topology=v5e:1x1 needs libtpu .*pip install "libtpu==0\.0\.42\.\*".*',
                        _error_line(result))


def test_a_seq_len_the_model_cannot_take_is_refused_before_compiling(converted):
    model, text = converted
    with pytest.raises(SavedRunError, match=r"^--seq_len=100 is not a multiple of --chunk_len=") as error:
        evaluate_run(str(model), data_path=str(text), seq_len=100, flag="--init_from")
    assert "\n" not in str(error.value)


@needs_libtpu
def test_topology_compiles_the_step_for_one_chip_and_sets_it_against_the_hbm(converted):
    model, text = converted
    entry = evaluate_run(str(model), data_path=str(text), seq_len=SEQ_LEN, flag="--init_from", topology="v5e:2x2")
    memory = entry["memory"]
    assert "loss" not in entry and "peak_rss_bytes" not in memory  # compiled, not run
    assert (memory["topology"], memory["device_kind"], memory["backend"]) == ("v5e:2x2", "TPU v5 lite", "tpu")
    assert memory["eval_step_peak_bytes"] == (memory["argument_bytes"] + memory["output_bytes"]
                                              - memory["alias_bytes"] + memory["temp_bytes"])
    assert memory["hbm_bytes"] == tpu.usable_hbm_bytes("v5e:1x1") and memory["fits"]
