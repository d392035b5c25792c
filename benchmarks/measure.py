"""Benchmark-side measurement helpers: the memory floor and the machine a figure was measured on.

The compile-and-measure functions themselves live in the library (`reformer_jax.memory.compile_train_step`,
`stats_from_analysis`).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, Dict

import jax
import jaxlib

from reformer_jax.memory import MemoryStats

FLOAT32_BYTES = 4
# The memory-floor issue's activation allowance: four [b, l, d_model] float32 tensors (the two reversible streams
# and their two cotangents).
FLOOR_STREAMS = 4


def floor_bytes(stats: MemoryStats, *, batch_size: int, seq_len: int, d_model: int) -> int:
    """The memory floor of the memory-floor issue: parameters + gradients + optimizer state + batch
    + 4 x batch x length x d_model x 4 bytes."""
    return (2 * stats.param_bytes + stats.optimizer_state_bytes + stats.batch_bytes
            + FLOOR_STREAMS * batch_size * seq_len * d_model * FLOAT32_BYTES)


def machine() -> Dict[str, Any]:
    """Where a number was measured: platform, CPU count, Python, jax and jaxlib versions, backend and devices."""
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python_version": sys.version.split()[0],
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind if devices else "none",
        "device_count": len(devices),
    }
