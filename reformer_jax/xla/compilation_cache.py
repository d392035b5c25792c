"""JAX's persistent compilation cache: switched on by one call, checked before anything compiles.

    enable_compilation_cache("~/.cache/reformer_jax/xla")   # main.py --compilation_cache_dir, the benchmarks too

A second process that compiles the same step (same model, shapes, jax/jaxlib and XLA flags) loads the executable
from the directory instead of compiling it. `CacheHits` counts the loads (JAX's own monitoring event), so a run
can say whether its compile time came from the cache.
"""

from __future__ import annotations

import os
from typing import Any

import jax

# JAX's event for an executable loaded from the persistent cache.
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def check_cache_dir(path: str, flag: str = "compilation_cache_dir") -> str:
    """The absolute cache directory, created if missing; a ValueError naming `--flag` if it cannot be used."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"--{flag}={path!r} is invalid: expected a directory path, e.g. "
                         f"--{flag}=~/.cache/reformer_jax/xla.")
    directory = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"--{flag}={path!r} is a file, not a directory; give a directory for the compiled "
                         "executables, e.g. ~/.cache/reformer_jax/xla.")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--{flag}={path!r} cannot be created ({error.strerror}); give a writable directory.") \
            from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"--{flag}={path!r} is not writable; give a writable directory.")
    return directory


def enable_compilation_cache(path: str, *, min_compile_time_s: float = 1.0, flag: str = "compilation_cache_dir") -> str:
    """Cache every executable whose compilation took at least `min_compile_time_s` in `path`.

    Call before the first compilation. Returns the absolute directory. JAX's default threshold (1 s) keeps the
    many tiny helper computations out of the cache; tests pass 0 to cache a small function.
    """
    if isinstance(min_compile_time_s, bool) or not isinstance(min_compile_time_s, (int, float)) \
            or min_compile_time_s < 0:
        raise ValueError(f"min_compile_time_s={min_compile_time_s!r} is invalid: expected seconds >= 0.")
    directory = check_cache_dir(path, flag)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


class CacheHits:
    """Counts executables loaded from the persistent cache while registered (a context manager)."""

    def __init__(self):
        self.count = 0

    def _listener(self, event: str, **_: Any) -> None:
        if event == CACHE_HIT_EVENT:
            self.count += 1

    def __enter__(self) -> "CacheHits":
        jax.monitoring.register_event_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_listener(self._listener)
