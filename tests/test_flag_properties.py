"""Property tests of every flag validator (main.py and the benchmark drivers): each combination is either accepted
(and then describes a consistent model, and a few really train a step) or refused with a message naming a flag.

The validators build no model and compile nothing, so hundreds of examples take seconds."""

import json
import math
import tempfile
from pathlib import Path

import pytest
from absl import app, flags
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import main
from benchmarks import memory as memory_driver
from benchmarks import reversible_drift as drift_driver

FLAGS = flags.FLAGS
MANY = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
LSH_PRESETS = ("lsh", "reformer")


def _render(name, value):
    if value is True:
        return f"--{name}"
    if value is False:
        return f"--no{name}"
    return f"--{name}={value}"


@st.composite
def _flag_args(draw, choices, max_flags=6):
    """argv: up to `max_flags` of the flags in `choices`, each "--name=value", "--name" or "--noname"."""
    names = draw(st.lists(st.sampled_from(sorted(choices)), max_size=max_flags, unique=True))
    return [_render(name, draw(st.sampled_from(choices[name]))) for name in names]


def _given_names(args):
    return {a[2:].split("=")[0].removeprefix("no") if "=" not in a and a.startswith("--no") and a[4:] in FLAGS
            else a[2:].split("=")[0] for a in args}


MAIN_CHOICES = {
    "model": ["transformer", "lsh", "reversible", "reformer", "bert"],
    "dataset": ["synthetic", "text", "tiny_shakespeare", "wiki"],
    "seq_len": [-1, 0, 2, 3, 16, 24, 32, 64, 100, 128, 256, "x"],
    "batch_size": [-1, 0, 1, 3, 8, "1.5"],
    "steps": [-1, 0, 1, 10],
    "schedule_steps": [0, 5], "warmup_steps": [-1, 0, 3],
    "learning_rate": [-1, 0, 1e-3, "inf", "nan"], "clip_norm": [0, 1.0, "inf"],
    "eval_every": [-1, 0, 5], "eval_batches": [0, 2], "checkpoint_every": [-1, 0, 2], "seed": [-3, 0, 7],
    "sample_len": [-1, 0, 10],
    "num_processes": [2], "process_id": [-1, 0, 2], "coordinator_address": ["host:1234"],
    "vocab_size": [0, 1, 2, 8, 259, 300],
    "d_model": [0, 8, 16, 30, 32, 64], "n_heads": [0, 1, 2, 3, 4], "d_head": [0, 4, 8],
    "d_ff": [0, 16], "n_layers": [0, 1, 2], "max_len": [0, 16, 64, 100, 256],
    "attention": ["full", "lsh", "sparse"], "reversible": [True, False], "sequential_rounds": [True, False],
    "n_hashes": [-1, 0, 1, 4], "chunk_len": [0, 1, 8, 16, 32, 64, 100],
    "n_buckets": ["", ",", "2", "7", "8", "4,4", "4,5", "8,4,2", "x", "0"],
    "n_chunks_before": [-1, 0, 1, 3, 40], "causal": [True, False], "ff_chunk_len": [-1, 0, 8],
    "dropout": [-0.1, 0, 0.5, 1.0, "nan"], "attention_dropout": [0, 1.5],
    "pos_embedding": ["absolute", "axial", "rope"], "axial_shape": ["", "4,4", "8,8", "16,16", "3,5", "x,y", "4,4,4"],
    "axial_dims": ["", "8,8", "16,16", "1,15", "0,16"], "output_head": ["mean", "concat"],
    "tie_embeddings": [True, False], "ff_activation": ["relu", "gelu", "tanh"], "layer_norm_eps": [0, 1e-6, -1],
    "scan_layers": [True, False], "dtype": ["float32", "bfloat16", "float64"], "skip_nonfinite": [True, False],
    "stream_grid_bits": [-1, 0, 16, 24],
}


def _parse_main(args):
    FLAGS.unparse_flags()
    FLAGS(["main.py", *args])


def _must_be_refused(args) -> bool:
    """A few rules, stated independently of the validator, that no accepted combination may break."""
    given = {a[2:].split("=")[0]: a.split("=", 1)[1] for a in args if "=" in a}
    seq_len, model = int(given.get("seq_len", 256)), given.get("model", "reformer")
    attention = given.get("attention", "lsh" if model in LSH_PRESETS else "full")
    chunk_len = int(given.get("chunk_len", 64))
    buckets = given.get("n_buckets")
    if buckets is not None and buckets.strip(",").isdigit() and int(buckets.strip(",")) % 2:
        return True
    if attention == "lsh" and chunk_len >= 1 and seq_len % chunk_len:
        return True
    if given.get("dataset") == "synthetic" and seq_len % 2:
        return True
    if given.get("dataset", "tiny_shakespeare") != "synthetic" and int(given.get("vocab_size", 259)) < 259:
        return True
    return False


@MANY
@given(_flag_args(MAIN_CHOICES))
def test_main_flags_are_accepted_consistently_or_refused_naming_a_flag(args):
    names = _given_names(args)
    try:
        _parse_main(args)
    except flags.Error as error:  # a wrong type or an unknown choice: absl names the flag
        event("refused by absl")
        assert any(f"--{name}" in str(error) for name in names), str(error)
        return
    try:
        main.validate_run_flags()
        config = main.model_config_from_flags()
    except app.UsageError as error:
        event("refused by the validator")
        message = str(error)
        assert any(f"{name}=" in message or f"--{name}" in message for name in names), (args, message)
        return
    finally:
        FLAGS.unparse_flags()
    event("accepted")
    assert not _must_be_refused(args), f"accepted: {args}"
    seq_len = int(dict(a[2:].split("=", 1) for a in args if "=" in a).get("seq_len", 256))
    assert seq_len <= config.max_len
    if config.attention == "lsh":
        assert seq_len % config.chunk_len == 0
    if config.pos_embedding == "axial":
        assert math.prod(config.axial_shape) == config.max_len and sum(config.axial_dims) == config.d_model
    for arg in args:  # every model flag given reached the config
        name, _, value = arg[2:].partition("=")
        if name in main.MODEL_FLAGS and name not in ("n_buckets", "axial_shape", "axial_dims") and value:
            assert str(getattr(config, name)) == str(FLAGS[name].parser.parse(value)), (name, value)


SMALL_CHOICES = {"seq_len": [16, 24, 32],
                 "chunk_len": [8, 16], "n_hashes": [1, 2], "batch_size": [1, 2], "sequential_rounds": [True, False],
                 "n_buckets": ["2", "4", "2,2"]}


# Slow run: two real main.py steps (~35 s on 2 cores); main.py's end-to-end test keeps one real run in the default.
@pytest.mark.long
@settings(max_examples=2, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["reformer", "lsh", "reversible", "transformer"]), _flag_args(SMALL_CHOICES))
def test_a_few_accepted_combinations_train_a_real_step(model, args):
    args = [f"--model={model}", *args]
    workdir = tempfile.mkdtemp(prefix="flags-")
    fixed = ["--dataset=synthetic", "--steps=1", "--d_model=16", "--n_heads=2", "--d_ff=32", "--n_layers=1",
             "--seq_len=16", "--chunk_len=8", "--n_hashes=1", "--eval_every=0", "--sample_len=0",
             "--noanalyze_memory", f"--workdir={workdir}"]
    try:
        _parse_main(fixed + args)
        main.validate_run_flags()
        main.model_config_from_flags()
    except app.UsageError as error:
        assert any(f"{name}=" in str(error) for name in _given_names(args)), str(error)
        FLAGS.unparse_flags()
        return
    try:
        assert main.main(["main.py"]) == 0
    finally:
        FLAGS.unparse_flags()
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"])


MEMORY_CHOICES = {
    "experiment": ["variants", "hashes", "layers", "seqlen", "timeline", "floor", "runtime", "all", "bogus"],
    "vocab_size": [0, 259], "d_model": [-1, 0, 30, 64, 512], "n_heads": [0, 3, 8], "d_ff": [0, 2048],
    "n_layers": [0, 2, 6], "seq_len": [0, 100, 1024, 4096, "x"], "n_hashes": [0, 8], "chunk_len": [0, 7, 64],
    "batch_size": [0, 1], "dropout": [-0.5, 0.1, 1.0], "dtype": ["float32", "bfloat16", "int8"],
    "optimizer": ["adafactor", "none", "sgd"], "seqlen_optimizer": ["none", "lion"],
    "models": ["", "reformer", "reformer,bert", "lsh,transformer"], "hash_sweep": ["", "1,2", "0,2", "a"],
    "layer_sweep": ["2,4", "-1"], "lengths": ["1024,2048", "100", ""], "runtime_models": ["lsh", "x"],
    "runtime_steps": [0, 2], "runtime_timeout_s": [0, 60], "floor_hashes": ["2,16", "2"],
    "floor_layers": ["2,12", "1,2,3"], "floor_lengths": ["4096", "1000"], "floor_long_len": [0, 1048576, 1000],
}


@MANY
@given(_flag_args(MEMORY_CHOICES))
def test_memory_driver_flags_are_accepted_consistently_or_refused_naming_a_flag(args):
    fv = flags.FlagValues()
    memory_driver.define_flags(fv)
    names = {a[2:].split("=")[0] for a in args}
    try:
        fv(["memory", *args])
        run = memory_driver.settings_from_flags(fv, ["memory", *args])
    except (flags.Error, memory_driver.FlagError) as error:
        event("refused")
        assert any(f"--{name}" in str(error) for name in names), (args, str(error))
        return
    event("accepted")
    for length in (run.seq_len, *run.lengths, *run.floor_lengths, run.floor_long_len):
        assert length % run.chunk_len == 0
    assert run.d_model % run.n_heads == 0 and len(run.floor_hashes) == len(run.floor_layers) == 2


DRIFT_CHOICES = {"depths": ["2,48", "", "0,2", "a"], "dtypes": ["float32", "bfloat16,float32", "float16", ""],
                 "d_model": [0, 30, 64], "n_heads": [0, 4], "d_ff": [0, 128], "seq_len": [0, 100, 128],
                 "chunk_len": [0, 32, 64], "n_hashes": [0, 2], "batch_size": [0, 1], "seed": [-1, 0]}


@MANY
@given(_flag_args(DRIFT_CHOICES))
def test_drift_driver_flags_are_accepted_consistently_or_refused_naming_a_flag(args):
    fv = flags.FlagValues()
    drift_driver.define_flags(fv)
    names = {a[2:].split("=")[0] for a in args}
    try:
        fv(["reversible_drift", *args])
        run = drift_driver.settings_from_flags(fv)
    except (flags.Error, drift_driver.FlagError) as error:
        event("refused")
        assert any(f"--{name}" in str(error) for name in names), (args, str(error))
        return
    event("accepted")
    config = drift_driver.drift_config(run["dtypes"][0], **run["sizes"])
    assert config.n_layers == max(run["depths"]) and fv.seq_len % config.chunk_len == 0


@pytest.mark.parametrize("args, expected", [
    (["--n_buckets=,"], "--n_buckets=',' is invalid"),
    (["--seq_len=2", "--dataset=synthetic", "--model=transformer"], "copy task needs an even length >= 4"),
    (["--vocab_size=1", "--dataset=synthetic"], "--vocab_size=1 is invalid for --dataset=synthetic"),
    (["--vocab_size=100"], "--vocab_size=100 is too small for byte-level --dataset=tiny_shakespeare"),
    (["--learning_rate=inf"], "--learning_rate=inf is invalid"),
    (["--num_processes=2", "--process_id=2", "--coordinator_address=h:1"], "--process_id=2 is invalid"),
    (["--seq_len=100"], "--seq_len=100 is invalid: LSH attention needs a multiple of chunk_len=64"),
])
def test_gaps_the_properties_found_are_refused(args, expected):
    _parse_main(args)
    try:
        with pytest.raises(app.UsageError) as error:
            main.validate_run_flags()
            main.model_config_from_flags()
    finally:
        FLAGS.unparse_flags()
    assert expected in str(error.value)


def test_full_attention_models_are_not_held_to_lsh_chunk_lengths():
    _parse_main(["--model=transformer", "--seq_len=16", "--dataset=synthetic"])
    try:
        main.validate_run_flags()
        assert main.model_config_from_flags().max_len == 16  # shorter than chunk_len=64: no LSH, no chunks
    finally:
        FLAGS.unparse_flags()
