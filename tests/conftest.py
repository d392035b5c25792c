"""Shared test settings: float32 everywhere, CPU, deterministic seeds."""

import os

# Compilation dominates this suite's time (tiny shapes, hundreds of programs). LLVM -O0 halves it and leaves
# everything the tests check alone: the optimised HLO, XLA's fusion decisions and buffer assignment (so every
# memory figure) are decided before LLVM runs. Subprocesses (main.py, the fault runner) inherit it.
# REFORMER_TEST_FULL_OPT=1 runs the suite with XLA's default code generation instead.
if os.environ.get("REFORMER_TEST_FULL_OPT") != "1":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
