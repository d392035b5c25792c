"""The command-line layer every benchmark driver shares: where results go, flag checks, logging, provenance.

A driver defines its absl flags, turns them into a frozen Settings with these checks (each raises `FlagError`
naming the flag, the value given and what would work, before anything is compiled), and records in every result
row the command and the checkout that produced it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional, Sequence, Tuple

DEFAULT_OUT_DIR = os.path.join("benchmarks", "results")
PRESETS = ("transformer", "lsh", "reversible", "reformer")


class FlagError(ValueError):
    """A bad flag value, found before anything is compiled."""


def log(message: str) -> None:
    """Progress goes to stderr, so stdout stays the driver's tables."""
    print(message, file=sys.stderr, flush=True)


def int_list(flag: str, values: Sequence[str], example: str, minimum: int = 1) -> Tuple[int, ...]:
    """A comma-separated list flag as integers >= minimum; `example` is a value that would work."""
    out = []
    for v in values:
        try:
            n = int(str(v).strip())
        except ValueError:
            raise FlagError(f"--{flag}={','.join(map(str, values))}: {v!r} is not an integer; expected a comma-"
                            f"separated list such as --{flag}={example}.") from None
        if n < minimum:
            raise FlagError(f"--{flag}={','.join(map(str, values))}: {n} is below {minimum}; expected e.g. "
                            f"--{flag}={example}.")
        out.append(n)
    if not out:
        raise FlagError(f"--{flag} is empty; expected e.g. --{flag}={example}.")
    return tuple(out)


def subset(flag: str, values: Sequence[str], valid: Sequence[str]) -> Tuple[str, ...]:
    """A comma-separated list flag whose every item is one of `valid`."""
    chosen = tuple(str(v).strip() for v in values)
    bad = [v for v in chosen if v not in valid]
    if bad or not chosen:
        raise FlagError(f"--{flag}={','.join(values)}: unknown {', '.join(map(repr, bad)) or '(none)'}; expected a "
                        f"comma-separated subset of {','.join(valid)}.")
    return chosen


def presets(flag: str, values: Sequence[str]) -> Tuple[str, ...]:
    """A comma-separated list of the four model presets."""
    return subset(flag, values, PRESETS)


def one_of(flag: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise FlagError(f"--{flag}={value!r} is unknown; expected one of {', '.join(valid)}.")
    return value


def at_least(fv, names: Sequence[str], minimum: int, defaults) -> None:
    """Every flag in `names` is an integer >= minimum (`defaults`: the Settings whose values the error quotes)."""
    for name in names:
        value = getattr(fv, name)
        if value is None or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise FlagError(f"--{name}={value} is invalid: expected {kind} (default {getattr(defaults, name)}).")


def cache_dir(path: str) -> str:
    """--compilation_cache_dir checked (created if missing), or '' when not given."""
    if not path:
        return ""
    from reformer_jax.xla.compilation_cache import check_cache_dir

    try:
        return check_cache_dir(path)
    except ValueError as err:
        raise FlagError(str(err)) from None


def command(module: str, argv: Optional[Sequence[str]]) -> str:
    """The command line that reproduces this run, as every result row records it."""
    return " ".join([f"python -m {module}"] + list((argv or [])[1:]))


def git_commit() -> Optional[str]:
    """The checkout's commit when the driver started (None outside a git clone): which code made the figures."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
