"""Shared test settings: float32 everywhere, CPU, deterministic seeds; the test tiers.

Tiers (pytest.ini):
- the fast tier, `python -m pytest -m "not slow"`: the kernel, model and config contracts (FAST_TIER_MODULES),
  in about two minutes on 2 cores;
- the default run, `python -m pytest` (what CI runs): every test but those marked `long`;
- `python -m pytest -m long`: longer checks kept out of the default run for its time budget.
A test outside FAST_TIER_MODULES, or marked `long`, is marked `slow` here.
"""

import os

import pytest

# Compilation dominates this suite's time (tiny shapes, hundreds of programs). LLVM -O0 halves it and leaves
# everything the tests check alone: the optimised HLO, XLA's fusion decisions and buffer assignment (so every
# memory figure) are decided before LLVM runs. Subprocesses (main.py, the fault runner) inherit it.
# REFORMER_TEST_FULL_OPT=1 runs the suite with XLA's default code generation instead.
if os.environ.get("REFORMER_TEST_FULL_OPT") != "1":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# The CPU backend, here and in every subprocess a test starts (main.py runs): with libtpu installed for the TPU
# compile tests, jax would otherwise probe for TPU chips at start-up and log its failure to find them.
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

# The contracts of the pure kernels, the model and its configuration: small shapes, no training runs, no
# subprocesses. Heavier cases inside these modules carry @pytest.mark.slow themselves.
FAST_TIER_MODULES = {
    "test_attention", "test_local_attention", "test_per_head_attention", "test_gradient_references",
    "test_reversible", "test_model", "test_config", "test_model_flags", "test_data", "test_decoding", "test_sampling",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ not in FAST_TIER_MODULES or item.get_closest_marker("long"):
            item.add_marker(pytest.mark.slow)
