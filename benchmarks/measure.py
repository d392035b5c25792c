"""Compile the real training step and read XLA's memory figures, with extra compiler options when needed.

`reformer_jax.memory.analyze_train_step` is the library's entry; the benchmarks also need the compiled executable
(to run it, or to compile it with XLA's dump options for the timeline), so `compile_step` lowers the same step
with `reformer_jax.memory.lower_train_step` and splits `memory_analysis()` exactly as `analyze_train_step` does
(a test checks that the two agree).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, Dict, Optional, Tuple

import jax
import jaxlib

from reformer_jax.config import ModelConfig
from reformer_jax.memory import MemoryStats, compiler_options, lower_train_step, tree_bytes

FLOAT32_BYTES = 4
# The memory-floor issue's activation allowance: four [b, l, d_model] float32 tensors (the two reversible streams
# and their two cotangents).
FLOOR_STREAMS = 4


def stats_from_analysis(analysis: Any, params: Any, opt_state: Any, batch: Any, backend: str) -> MemoryStats:
    """`MemoryStats` from a compiled step's `memory_analysis()` and the abstract step inputs."""
    argument = int(analysis.argument_size_in_bytes)
    output = int(analysis.output_size_in_bytes)
    alias = int(analysis.alias_size_in_bytes)
    temp = int(analysis.temp_size_in_bytes)
    peak = argument + output - alias + temp
    param_bytes = tree_bytes(params)
    opt_bytes = tree_bytes(opt_state) if opt_state is not None else 0
    batch_bytes = tree_bytes(batch)
    return MemoryStats(
        argument_bytes=argument, output_bytes=output, alias_bytes=alias, temp_bytes=temp, peak_bytes=peak,
        param_bytes=param_bytes, optimizer_state_bytes=opt_bytes, batch_bytes=batch_bytes,
        activation_bytes=peak - 2 * param_bytes - opt_bytes - batch_bytes,
        jax_version=jax.__version__, jaxlib_version=jaxlib.__version__, backend=backend)


def compile_step(config: ModelConfig, *, batch_size: int, seq_len: int, optimizer: Optional[str] = "adafactor",
                 extra_options: Optional[Dict[str, Any]] = None) -> Tuple[Any, MemoryStats]:
    """(compiled step, its MemoryStats). `extra_options` are added to the backend's measuring options."""
    lowered, params, opt_state, batch = lower_train_step(config, batch_size=batch_size, seq_len=seq_len,
                                                         optimizer=optimizer)
    backend = jax.default_backend()
    options = {**compiler_options(backend), **(extra_options or {})}
    compiled = lowered.compile(options)
    return compiled, stats_from_analysis(compiled.memory_analysis(), params, opt_state, batch, backend)


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
