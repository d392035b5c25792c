"""The machine a figure was measured on, and the process's peak memory (the memory analysis itself lives in the
library: `reformer_jax.memory`)."""

from __future__ import annotations

import os
import platform
import resource
import sys
from typing import Any, Dict

import jax
import jaxlib


def machine() -> Dict[str, Any]:
    """Where a number was measured: platform, CPU count, Python, jax and jaxlib versions, backend and devices."""
    devices = jax.devices()
    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "python_version": sys.version.split()[0], "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__, "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind if devices else "none", "device_count": len(devices)}


def ru_maxrss_bytes() -> int:
    """This process's RSS high-water mark, compilation included (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value if sys.platform == "darwin" else value * 1024)
