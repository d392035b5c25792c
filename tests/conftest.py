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

# Compilation dominates this suite's time (tiny shapes, hundreds of programs). Two XLA:CPU code-generation
# settings cut it by about a third: LLVM -O0, and XLA's classic emitters instead of its MLIR fusion emitters (the
# default's). Neither changes what a program computes, only how fast its machine code runs. The classic emitters do
# change the compiled program slightly (gathers become loops) and rounding (a program and a variant of it, e.g. the
# guarded step, may then differ in the last bit), so tests that read a compiled program's ops or compare two
# programs bit for bit compile with USER_CODEGEN, the fusion emitters a user's run gets (LLVM -O0 changes neither
# the program nor its results). Subprocesses (main.py, the fault runner) inherit the flags.
# REFORMER_TEST_FULL_OPT=1 runs the whole suite with XLA's default code generation.
TEST_CODEGEN_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if os.environ.get("REFORMER_TEST_FULL_OPT") != "1":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_CODEGEN_FLAGS).strip()
# Compiler options (per program, over XLA_FLAGS) that restore a user's code generation for one compile.
USER_CODEGEN = {"xla_cpu_use_fusion_emitters": True}

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
