"""Shared test settings: float32 everywhere, CPU, deterministic seeds."""

import os
import sys

# Run from a fresh clone without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
