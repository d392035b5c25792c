"""Memory shape from compile-time analysis: flat in depth when reversible, l^2 for full attention, l for LSH."""

import jax
import numpy as np
import pytest

from reformer_jax import ModelConfig
from reformer_jax.memory import analyze_train_step
from reformer_jax.xla.memory_analysis import MemoryStats, tree_bytes
from reformer_jax.model.reformer_lm import init_params


def tiny(name, **overrides):
    base = dict(vocab_size=32, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_len=1024, chunk_len=32, n_hashes=2,
                dropout=0.1)
    return ModelConfig.preset(name, **{**base, **overrides})


def activation_bytes(name, seq_len=512, **overrides):
    return analyze_train_step(tiny(name, **overrides), batch_size=1, seq_len=seq_len,
                              optimizer=None).activation_bytes


@pytest.mark.parametrize("name, reversible", [("transformer", False), ("lsh", False), ("reversible", True),
                                              ("reformer", True)])
def test_activation_memory_against_depth(name, reversible):
    shallow, deep = activation_bytes(name, n_layers=2), activation_bytes(name, n_layers=8)
    if reversible:
        assert abs(deep - shallow) <= 0.05 * shallow, (shallow, deep)
    else:
        # Each extra layer stores at least its feed-forward hidden activation [1, 512, d_ff] float32.
        assert deep - shallow >= 6 * 512 * 64 * 4, (shallow, deep)


@pytest.mark.parametrize("name, exponent", [("transformer", 2), ("lsh", 1), ("reversible", 2), ("reformer", 1)])
def test_activation_memory_against_length(name, exponent):
    """The growth with length, m(2l) - m(l) ~ l^exponent: differences cancel the length-independent bytes (the
    Reformer's are a third of its total at 256 tokens), which bend a power-law fit of m itself below 1."""
    lengths = [256, 512, 1024]
    measured = [activation_bytes(name, seq_len=length) for length in lengths]
    growth = np.diff(measured)  # m(512) - m(256), m(1024) - m(512)
    assert np.all(growth > 0), measured
    fitted = np.log2(growth[1] / growth[0])
    assert abs(fitted - exponent) <= 0.15, (measured, fitted)


def test_stats_fields_are_consistent_for_the_full_step():
    cfg = tiny("reformer")
    stats = analyze_train_step(cfg, batch_size=2, seq_len=256, optimizer="adafactor")
    assert isinstance(stats, MemoryStats)
    assert stats.peak_bytes == stats.argument_bytes + stats.output_bytes - stats.alias_bytes + stats.temp_bytes
    assert stats.param_bytes == tree_bytes(init_params(cfg, jax.random.key(0)))
    assert stats.optimizer_state_bytes > 0
    assert stats.batch_bytes == 2 * 256 * (4 + 4 + 4)
    assert stats.activation_bytes == (stats.peak_bytes - 2 * stats.param_bytes - stats.optimizer_state_bytes
                                      - stats.batch_bytes)
    assert stats.alias_bytes >= stats.param_bytes  # the state is donated
    assert stats.backend == "cpu" and stats.jax_version == jax.__version__
    assert set(stats.to_dict()) >= {"peak_bytes", "activation_bytes", "jaxlib_version"}
    adamw = analyze_train_step(cfg, batch_size=2, seq_len=256, optimizer="adamw")
    assert adamw.optimizer_state_bytes > 2 * adamw.param_bytes  # two moments per parameter


def test_analysis_never_allocates_the_model():
    """A configuration far beyond this host's memory still compiles and reports its peak."""
    cfg = ModelConfig.preset("transformer", n_layers=2, max_len=65536, vocab_size=32, d_model=64, n_heads=4,
                             d_ff=128)
    stats = analyze_train_step(cfg, batch_size=8, seq_len=65536, optimizer=None)
    assert stats.peak_bytes > 64 * 2**30  # scores alone: 8 x 4 heads x 65536^2 x 4 bytes = 512 GiB


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0, seq_len=256), "batch_size=0"),
    (dict(batch_size=1, seq_len=100), "seq_len=100 is not a multiple of ModelConfig.chunk_len=32"),
    (dict(batch_size=1, seq_len=256, optimizer="sgd"), "optimizer='sgd' is unknown"),
])
def test_bad_arguments_are_rejected_before_compiling(kwargs, message):
    with pytest.raises(ValueError) as err:
        analyze_train_step(tiny("reformer"), **kwargs)
    assert message in str(err.value)
