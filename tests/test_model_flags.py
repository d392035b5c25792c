"""Model flags generated from ModelConfig's fields, and the named sizes main.py and the drivers share."""

import dataclasses

import pytest
from absl import flags

from reformer_jax.model import sizes
from reformer_jax.model.config import ModelConfig
from reformer_jax.model_flags import define_model_flags, field_docs, parse_value


def test_every_field_is_a_flag_of_its_type_with_its_docstring_help():
    fv = flags.FlagValues()
    names = define_model_flags(ModelConfig, flag_values=fv)
    assert names == [f.name for f in dataclasses.fields(ModelConfig)]
    docs = field_docs(ModelConfig)
    assert set(docs) == set(names)  # the docstring documents every field
    kinds = {name: fv[name].flag_type() for name in names}
    assert kinds["d_model"] == "int" and kinds["dropout"] == "float" and kinds["reversible"] == "bool"
    assert kinds["attention"] == "string enum" and kinds["axial_shape"] == "comma separated list of strings" and kinds["n_buckets"] == "string"
    assert fv["sequential_rounds"].help.startswith(docs["sequential_rounds"])
    assert all(fv[name].default is None for name in names)  # unset: the preset's value


def test_a_new_documented_field_becomes_a_flag_without_another_edit():
    @dataclasses.dataclass(frozen=True)
    class Extended(ModelConfig):
        """A config with one more field.

        Attributes:
          rope_base: base of the rotary position frequencies.
          kv_groups: heads sharing one key/value projection, per layer.
        """

        rope_base: float = 10_000.0
        kv_groups: tuple = ()

    fv = flags.FlagValues()
    define_model_flags(Extended, flag_values=fv)
    fv(["prog", "--rope_base=500", "--kv_groups=a,b"])
    assert fv.rope_base == 500.0 and fv["rope_base"].flag_type() == "float"
    assert fv["rope_base"].help.startswith("base of the rotary position frequencies.")
    assert parse_value(Extended, "kv_groups", fv.kv_groups) == ("a", "b")


def test_flag_values_become_field_values_or_a_message_naming_the_flag():
    assert parse_value(ModelConfig, "n_buckets", "8") == 8
    assert parse_value(ModelConfig, "n_buckets", "8,4") == (8, 4)
    assert parse_value(ModelConfig, "axial_shape", ["16", "32"]) == (16, 32)
    assert parse_value(ModelConfig, "attn_layers", ["local", "lsh"]) == ("local", "lsh")
    with pytest.raises(ValueError, match="--axial_dims=1,x is invalid: expected integers"):
        parse_value(ModelConfig, "axial_dims", ["1", "x"])


def test_main_keeps_its_flag_names_and_cpu_defaults_from_the_named_sizes():
    import main

    f = flags.FLAGS
    assert set(main.MODEL_FLAGS) == {field.name for field in dataclasses.fields(ModelConfig)}
    assert (f["d_model"].default, f["n_heads"].default, f["d_ff"].default, f["n_layers"].default,
            f["seq_len"].default, f["batch_size"].default) == (256, 4, 1024, 3, 256, 8)
    assert sizes.CPU == sizes.Sizes(d_model=256, n_heads=4, d_ff=1024, n_layers=3, seq_len=256, batch_size=8)
    assert f["n_hashes"].default is None and f["attention"].default is None


def test_named_sizes_fill_the_size_flags_not_given():
    import main

    f = flags.FLAGS
    f.unparse_flags()
    try:
        f(["main.py", "--sizes=seed", "--n_layers=2"])
        main.validate_run_flags()
        config = main.model_config_from_flags()
        assert (config.d_model, config.n_heads, config.d_ff, config.n_layers, config.max_len) == (512, 8, 2048, 2, 4096)
        assert (f.seq_len, f.batch_size) == (4096, 1)
    finally:
        f.unparse_flags()


def test_drivers_take_their_defaults_from_the_named_sizes():
    from benchmarks import memory, speed

    for settings, named in ((memory.Settings(), sizes.SEED), (speed.Settings(), sizes.SPEED_P)):
        assert {k: getattr(settings, k) for k in dataclasses.asdict(named)} == dataclasses.asdict(named)
    # the figures they produce are of these sizes, as before
    assert (sizes.SEED.d_model, sizes.SEED.n_layers, sizes.SEED.seq_len) == (512, 6, 4096)
    assert (sizes.SPEED_P.d_model, sizes.SPEED_P.n_layers, sizes.SPEED_P.seq_len) == (256, 6, 4096)


def test_quality_driver_defaults_are_the_named_quality_sizes():
    from benchmarks import quality

    fv = flags.FlagValues()
    quality.define_flags(fv)
    shakespeare, copy = sizes.QUALITY_SHAKESPEARE, sizes.QUALITY_COPY
    assert (fv["d_model"].default, fv["n_heads"].default, fv["d_ff"].default, fv["n_layers"].default,
            fv["seq_len"].default, fv["batch_size"].default) == (128, 4, 512, 2, 256, 8)
    assert (shakespeare.d_model, shakespeare.d_ff, shakespeare.n_layers) == (128, 512, 2)
    assert (fv["synthetic_d_model"].default, fv["synthetic_d_ff"].default, fv["synthetic_seq_len"].default,
            fv["synthetic_batch_size"].default, fv["synthetic_vocab_size"].default) == (
                copy.d_model, copy.d_ff, copy.seq_len, copy.batch_size, copy.vocab_size) == (256, 1024, 256, 16, 128)
