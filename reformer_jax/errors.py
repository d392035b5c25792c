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
