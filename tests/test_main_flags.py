"""main.py: every flag validation error names the flag and what would work, before anything compiles."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import app, flags

import main

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS


@pytest.fixture
def parse():
    def _parse(*args):
        FLAGS.unparse_flags()
        FLAGS(["main.py", *args])
    yield _parse
    FLAGS.unparse_flags()


def _usage_error(*args) -> str:
    with pytest.raises(app.UsageError) as err:
        FLAGS.unparse_flags()
        FLAGS(["main.py", *args])
        main.validate_run_flags()
        main.model_config_from_flags()
    FLAGS.unparse_flags()
    return str(err.value)


@pytest.mark.parametrize("args, expected", [
    (["--seq_len=0"], "--seq_len=0 is invalid: expected a positive integer"),
    (["--batch_size=0"], "--batch_size=0 is invalid"),
    (["--steps=0"], "--steps=0 is invalid"),
    (["--eval_batches=0"], "--eval_batches=0 is invalid"),
    (["--eval_every=-1"], "--eval_every=-1 is invalid: expected an integer >= 0"),
    (["--checkpoint_every=-5"], "--checkpoint_every=-5 is invalid"),
    (["--sample_len=-1"], "--sample_len=-1 is invalid"),
    (["--seed=-1"], "--seed=-1 is invalid"),
    (["--schedule_steps=0"], "--schedule_steps=0 is invalid"),
    (["--warmup_steps=0"], "--warmup_steps=0 is invalid"),
    (["--learning_rate=0"], "--learning_rate=0.0 is invalid: expected a positive number"),
    (["--clip_norm=-1"], "--clip_norm=-1.0 is invalid"),
    (["--dataset=synthetic", "--seq_len=511", "--model=transformer"], "copy task needs an even length"),
    (["--dataset=text"], "--dataset=text needs --data_path"),
    (["--num_processes=2"], "need --coordinator_address, --num_processes and --process_id together"),
    (["--n_buckets=7"], "--n_buckets=7 is invalid: expected an even integer"),
    (["--n_buckets=4,x"], "--n_buckets=4,x is invalid: expected integers"),
    (["--n_buckets=4,5"], "--n_buckets=(4, 5) is invalid: a factorised bucket count is a tuple of two even"),
    (["--axial_shape=3,5"], "--axial_shape=(3, 5) is invalid: expected two positive integers whose product is "
                            "max_len=256"),
    (["--axial_dims=100,100"], "--axial_dims=(100, 100) is invalid"),
    (["--seq_len=100"], "--seq_len=100 is invalid: LSH attention needs a multiple of chunk_len=64"),
    (["--seq_len=100", "--max_len=100"], "--max_len=100 is invalid: LSH attention needs a multiple of chunk_len=64"),
    (["--seq_len=256", "--max_len=128"], "seq_len=256 is longer than --max_len=128"),
    (["--chunk_len=0"], "--chunk_len=0 is invalid: expected a positive integer"),
    (["--d_model=100", "--n_heads=3"], "--d_model=100 is invalid: --d_model=100 is not divisible by --n_heads=3"),
    (["--d_model=250"], "--d_model=250 is invalid: --d_model=250 is not divisible by --n_heads=4"),
    (["--n_heads=3"], "--n_heads=3 is invalid: --d_model=256 is not divisible by --n_heads=3"),
    (["--dropout=1.5"], "--dropout=1.5 is invalid: expected a rate in [0, 1)"),
    (["--n_hashes=0"], "--n_hashes=0 is invalid"),
    (["--n_layers=0"], "--n_layers=0 is invalid"),
    (["--output_head=concat"], "--output_head=concat is invalid with tied embeddings (the default)"),
    (["--output_head=concat", "--tie_embeddings"], "--tie_embeddings=True is invalid"),
    (["--model=transformer", "--output_head=concat", "--notie_embeddings"], "--output_head='concat' is invalid"),
    (["--layer_norm_eps=0"], "--layer_norm_eps=0.0 is invalid"),
    (["--time_limit_minutes=0"], "--time_limit_minutes=0.0 is invalid: expected a positive number"),
])
def test_bad_flags_are_refused_with_the_flag_named(args, expected):
    assert expected in _usage_error(*args)


@pytest.mark.parametrize("arg", ["--model=bert", "--optimizer=sgd", "--dataset=wiki", "--dtype=float64",
                                 "--steps=abc", "--attention=sparse", "--pos_embedding=rope"])
def test_bad_choices_are_refused_by_absl(arg):
    with pytest.raises(flags.IllegalFlagValueError) as err:
        FLAGS.unparse_flags()
        FLAGS(["main.py", arg])
    FLAGS.unparse_flags()
    assert arg.split("=")[0].lstrip("-") in str(err.value)


def test_model_flags_override_the_preset_only_when_given(parse):
    parse("--model=lsh", "--n_hashes=2", "--n_buckets=8,4", "--axial_shape=16,32", "--seq_len=512")
    config = main.model_config_from_flags()
    assert (config.attention, config.reversible, config.n_hashes, config.n_buckets) == ("lsh", False, 2, (8, 4))
    assert config.axial_shape == (16, 32) and config.max_len == 512 and config.chunk_len == 64
    parse("--model=reformer", "--reversible=false", "--dtype=bfloat16")
    config = main.model_config_from_flags()
    assert config.reversible is False and config.dtype == "bfloat16" and config.ff_chunk_len == 256


def test_every_model_config_field_is_a_flag():
    assert set(main.MODEL_FLAGS) <= set(FLAGS)


def test_user_mistakes_exit_nonzero_without_traceback(tmp_path):
    bad_flag = subprocess.run([sys.executable, str(REPO / "main.py"), "--n_buckets=7"], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
    assert bad_flag.returncode != 0 and "--n_buckets=7 is invalid" in bad_flag.stderr
    assert "Traceback" not in bad_flag.stderr
    missing = subprocess.run([sys.executable, str(REPO / "main.py"), f"--data_path={tmp_path / 'none.txt'}"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("how", ["XLA_FLAGS", "--host_devices"])
def test_the_users_device_count_wins_over_the_cpu_default(tmp_path, how):
    """A device count the user set (JAX's own XLA_FLAGS, or --host_devices) is kept, with data:-1 over it, and the
    header says which setting chose the devices."""
    env = dict(os.environ)
    args = ["--model=transformer", "--dataset=synthetic", "--d_model=32", "--n_heads=2", "--d_ff=64", "--n_layers=1",
            "--seq_len=16", "--batch_size=8", "--steps=1", "--eval_every=0", "--sample_len=0",
            "--noanalyze_memory", f"--workdir={tmp_path / 'run'}"]
    if how == "XLA_FLAGS":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
        chosen = "devices from XLA_FLAGS --xla_force_host_platform_device_count=8; mesh from the default"
    else:
        args.append("--host_devices=8")
        chosen = "devices from --host_devices=8; mesh from the default"
    result = subprocess.run([sys.executable, str(REPO / "main.py"), *args], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "devices: 8 (cpu), mesh data:8,fsdp:1,tensor:1" in result.stdout and chosen in result.stdout, result.stdout
