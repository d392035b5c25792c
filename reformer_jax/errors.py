"""The one error type for a setting that cannot work.

    raise SettingError("ModelConfig", "n_heads", 3, "is invalid: expected a divisor of d_model=64.")
    str(error)        -> "ModelConfig.n_heads=3 is invalid: expected a divisor of d_model=64."
    error.as_flags()  -> "--n_heads=3 is invalid: expected a divisor of d_model=64."

`ModelConfig`, `TrainOptions` and the library's other settings raise it with the field, the value given and what
would work; a command line shows it in its own flag names with `as_flags` (every `Owner.field` the message names
becomes `--field`, or the flag a `rename` maps it to), so the library never names a command-line flag and no caller
parses the text.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Mapping, Optional


class SettingError(ValueError):
    """A setting that cannot work: `owner` (e.g. "ModelConfig"; "" for a bare argument), `field`, `value` and
    `text`, the rest of the one-line message after "field=value" (what is wrong and what would work; it may name
    other settings as Owner.field); `shown`: the value as the message writes it (default its repr)."""

    def __init__(self, owner: str, field: str, value: Any, text: str, shown: Optional[str] = None):
        self.owner, self.field, self.value, self.text = owner, field, value, text
        self.shown = repr(value) if shown is None else shown  # how the value reads in the message
        super().__init__(f"{owner + '.' if owner else ''}{field}={self.shown} {text}")

    def as_flags(self, rename: Optional[Mapping[str, str]] = None, value: Any = None) -> str:
        """The message in command-line terms: every Owner.field (and the leading field) written `--field`, or
        `--rename[field]`; `value`, where given, replaces the value shown."""
        rename = rename or {}

        def flag(field: str) -> str:
            return "--" + rename.get(field, field)

        text = re.sub(r"\b[A-Z][A-Za-z]*\.([a-z_][a-z0-9_]*)\b", lambda m: flag(m.group(1)), self.text)
        return f"{flag(self.field)}={self.shown if value is None else repr(value)} {text}"


def in_flags(error: Exception, rename: Optional[Mapping[str, str]] = None) -> str:
    """An error's one-line message in a command line's flag names: a SettingError's `as_flags(rename)`, any other
    error's own text."""
    return error.as_flags(rename) if isinstance(error, SettingError) else str(error)


# --- how a message names a setting ---------------------------------------------------------------------------------

_RUN_SETTINGS = frozenset({"workdir", "steps", "schedule_steps", "warmup_steps", "learning_rate", "optimizer",
                           "clip_norm", "batch_size", "seq_len", "dataset", "data_path", "seed", "eval_every",
                           "eval_batches", "checkpoint_every", "sample_len", "skip_nonfinite", "init_from",
                           "time_limit_minutes", "mesh"})
_flag_names = [0]  # > 0 while a command line runs (`flag_names`)


@contextlib.contextmanager
def flag_names():
    """While a command line runs: the library's messages name settings as its flags (`--workdir`)."""
    _flag_names[0] += 1
    try:
        yield
    finally:
        _flag_names[0] -= 1


def setting(field: str) -> str:
    """How a message names the setting `field`: `--field` inside `flag_names()` (a command line), else
    `TrainOptions.field` for a run's setting or the bare argument name."""
    if _flag_names[0]:
        return f"--{field}"
    return f"TrainOptions.{field}" if field in _RUN_SETTINGS else field
