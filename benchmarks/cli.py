"""The command-line layer every benchmark driver shares: settings as flags, flag checks, logging, provenance.

A driver writes its settings once, as a frozen dataclass whose docstring's "Attributes:" table is the flags' help
(a model field without an entry takes ModelConfig's own); `define_flags` makes one flag per field and
`settings_from_flags` turns them back into the dataclass, each bad value a one-line `FlagError` naming the flag,
the value and what would work, before anything is compiled. Every result row records the command that made it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from absl import app, flags

from reformer_jax import cli as job_cli
from reformer_jax import errors
from reformer_jax.model.config import ModelConfig
from reformer_jax.model.sizes import Sizes
from reformer_jax.model_flags import field_docs

DEFAULT_OUT_DIR = os.path.join("benchmarks", "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FlagError(ValueError):
    """A bad flag value, found before anything is compiled."""


def log(message: str) -> None:
    """Progress goes to stderr, so stdout stays the driver's tables."""
    print(message, file=sys.stderr, flush=True)


def int_list(flag: str, values: Sequence[str], example: str, minimum: int = 1, words: Sequence[str] = ()) -> tuple:
    """A comma-separated list flag as integers >= minimum (and any of `words`, kept as they are); `example` is a
    value that would work."""
    out: list = []
    for v in values:
        if str(v).strip() in words:
            out.append(str(v).strip())
            continue
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


def one_of(flag: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise FlagError(f"--{flag}={value!r} is unknown; expected one of {', '.join(valid)}.")
    return value


def check_lengths(chunk_len: int, **lengths: Sequence[int]) -> None:
    """Every length given to these flags a multiple of --chunk_len, as LSH attention needs."""
    for flag, values in lengths.items():
        for length in values:
            if length % chunk_len:
                raise FlagError(f"--{flag}: length {length} is not a multiple of --chunk_len={chunk_len}, which LSH "
                                f"attention needs; e.g. {max(1, length // chunk_len) * chunk_len}.")


def check_model(build: Callable[[], Any]) -> None:
    """`build()` makes every configuration the run will use, so a bad combination fails before any compilation."""
    try:
        build()
    except ValueError as err:
        raise FlagError(f"the size flags give an invalid model: {errors.in_flags(err)}") from None


def cache_dir(path: str) -> str:
    """--compilation_cache_dir checked (created if missing), or '' when not given."""
    if not path:
        return ""
    from reformer_jax.xla.compilation_cache import check_cache_dir

    try:
        return check_cache_dir(path)
    except ValueError as err:
        raise FlagError(str(err)) from None


def sized(sizes: Sizes) -> type:
    """The base of a driver's Settings: `Sizes`' fields (d_model .. chunk_len) with `sizes`' values as their
    defaults, so a driver declares its size flags once, by naming its sizes (`model.sizes.SEED`, ...)."""
    fields = [(f.name, int, dataclasses.field(default=getattr(sizes, f.name))) for f in dataclasses.fields(Sizes)]
    return dataclasses.make_dataclass("Sized", fields, bases=(Sizes,), frozen=True)


def define_flags(cls: type, flag_values: flags.FlagValues) -> None:
    """One flag per field of the Settings dataclass `cls` (but `command`), typed by its default: a tuple is a
    comma-separated list. They belong to the caller's module in --help, as if it had defined them."""
    caller = sys._getframe(1).f_globals.get("__name__", "")
    module_name = sys.argv[0] if caller == "__main__" else caller
    docs = {**field_docs(ModelConfig), **field_docs(cls)}
    kinds = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float, tuple: flags.DEFINE_list}
    for field in dataclasses.fields(cls):
        if field.name != "command":
            default = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
            kinds.get(type(field.default), flags.DEFINE_string)(field.name, default, docs.get(field.name, field.name),
                                                                flag_values=flag_values, module_name=module_name)


def settings_from_flags(cls: type, fv: flags.FlagValues, module: str, argv: Optional[Sequence[str]], *,
                        choices: Dict[str, Sequence[str]], minimum: Dict[str, Optional[int]],
                        parse: Optional[Dict[str, Callable[[Any], Any]]] = None):
    """The Settings the flags give, every value checked: `choices` (a list flag: a subset of them), integers at
    least `minimum.get(name, 1)` (None: unchecked), lists of integers (their default's type) and the `parse`
    functions of the others (which raise FlagError)."""
    values: Dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        name, default = field.name, field.default
        if name == "command":
            continue
        value = fv[name].value
        if parse and name in parse:
            value = parse[name](value)
        elif isinstance(default, tuple):
            value = (subset(name, value, choices[name]) if name in choices else
                     int_list(name, value, ",".join(map(str, default))) if default and isinstance(default[0], int)
                     else tuple(value))
        elif name in choices:
            one_of(name, value, choices[name])
        elif type(default) is int and minimum.get(name, 1) is not None and (value is None or value < minimum.get(name, 1)):
            kind = "a positive integer" if minimum.get(name, 1) == 1 else f"an integer >= {minimum[name]}"
            raise FlagError(f"--{name}={value} is invalid: expected {kind} (default {default}).")
        values[name] = value
    return cls(**values, command=command(module, argv))


def main(settings_from_flags: Callable[..., Any], run: Callable[[Any], Any]) -> None:
    """absl's app.run of a driver whose flags are defined: `run(settings_from_flags(flags.FLAGS, sys.argv))`, a bad
    flag one line (absl's usage error) before anything compiles. On a machine without TPU chips, jax is kept from
    probing for them (and printing the probe's failure), as for main.py; the TPU experiments compile for a
    topology all the same."""
    job_cli.quiet_absent_tpu()

    def checked(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}; use --flag=value.")
        try:
            settings = settings_from_flags(flags.FLAGS, sys.argv)
        except FlagError as err:
            raise app.UsageError(str(err)) from None
        run(settings)

    app.run(checked)


def worker_env() -> Dict[str, str]:
    """The environment of a worker process started with `python -m benchmarks.NAME` from the repository root: this
    checkout first on its path, device memory allocated as used (no preallocation)."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def command(module: str, argv: Optional[Sequence[str]]) -> str:
    """The command line that reproduces this run, as every result row records it."""
    return " ".join([f"python -m {module}"] + list((argv or [])[1:]))


def git_commit() -> Optional[str]:
    """The checkout's commit when the driver started (None outside a git clone): which code made the figures."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None

