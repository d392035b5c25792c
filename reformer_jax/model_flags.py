"""Command-line flags generated from ModelConfig's fields: a new field is a flag without a second edit.

Each field becomes a flag of its name, typed from its annotation (bool, int, float, str: an enum where
`CHOICES` lists the values; tuples: comma-separated lists; `n_buckets`, an int or a pair: a string), with its
help from the "Attributes:" table of the class docstring. A flag left unset (None) keeps the preset's value.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from typing import Any, Dict, List, Optional

from absl import flags

from reformer_jax.model.config import ATTENTION_TYPES, DTYPES, FF_ACTIVATIONS, OUTPUT_HEADS, POS_EMBEDDINGS, ModelConfig

CHOICES = {"attention": ATTENTION_TYPES, "pos_embedding": POS_EMBEDDINGS, "output_head": OUTPUT_HEADS,
           "ff_activation": FF_ACTIVATIONS, "dtype": DTYPES, "param_dtype": DTYPES}
# How a value is written on the command line, where that differs from the field's Python value.
WRITTEN_AS = {"n_buckets": "Write an even integer or two even factors f1,f2.",
              "attn_layers": "Write the types separated by commas, e.g. local,lsh,local,lsh.",
              "axial_shape": "Write l1,l2.", "axial_dims": "Write d1,d2."}


def field_docs(cls: type) -> Dict[str, str]:
    """{field: its description} from the "Attributes:" sections of the docstrings of `cls` and its bases
    (continuation lines joined; a subclass's entry wins)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        parts = (klass.__dict__.get("__doc__") or "").split("Attributes:", 1)
        if len(parts) < 2:
            continue
        lines = [line for line in parts[1].splitlines()]
        indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
        base, name = (indents[0] if indents else 0), None
        for line in lines:
            indent = len(line) - len(line.lstrip())
            entry = re.match(r"^(\w+): (.*)$", line.strip())
            if not line.strip() or indent < base:
                name = None
            elif indent == base and entry and entry.group(1) in fields:
                name = entry.group(1)
                docs[name] = entry.group(2).strip()
            elif name and indent > base:
                docs[name] += " " + line.strip()
    return docs


def _base_types(annotation) -> tuple:
    """The types an annotation allows, without None: Optional[int] -> (int,), Union[int, Tuple] -> (int, tuple)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)
    return tuple(typing.get_origin(a) or a for a in args if a is not type(None))


def _element_type(annotation) -> type:
    """int or str: what a tuple field holds (Optional[Tuple[int, int]] -> int)."""
    for arg in (typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)):
        if typing.get_origin(arg) is tuple:
            return typing.get_args(arg)[0]
    return str


def define_model_flags(cls: type = ModelConfig, defaults: Optional[Dict[str, Any]] = None,
                       flag_values: flags.FlagValues = flags.FLAGS, extra_help: Optional[Dict[str, str]] = None,
                       module_name: Optional[str] = None) -> List[str]:
    """Define one flag per field of the dataclass `cls`; returns the field names.

    defaults: flag defaults (a field missing here defaults to None: the preset's value); extra_help: text added
    to a field's help; module_name: the module the flags belong to in --help (default: the caller's, as if it had
    defined them itself).
    """
    defaults, extra_help = defaults or {}, extra_help or {}
    if module_name is None:
        module_name = sys._getframe(1).f_globals.get("__name__", "")
        module_name = sys.argv[0] if module_name == "__main__" else module_name
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    names = []
    for field in dataclasses.fields(cls):
        name, types = field.name, _base_types(hints[field.name])
        default = defaults.get(name)
        help_ = " ".join(part for part in (docs.get(name, name.replace("_", " ")).rstrip(".") + ".",
                                           WRITTEN_AS.get(name, ""), extra_help.get(name, ""),
                                           f"(ModelConfig's default: {field.default!r})"
                                           if default is not None else "(default: the preset's value)") if part)
        kwargs = dict(flag_values=flag_values, module_name=module_name)
        if name in CHOICES:
            flags.DEFINE_enum(name, default, list(CHOICES[name]), help_, **kwargs)
        elif types == (bool,):
            flags.DEFINE_bool(name, default, help_, **kwargs)
        elif types == (int,):
            flags.DEFINE_integer(name, default, help_, **kwargs)
        elif types == (float,):
            flags.DEFINE_float(name, default, help_, **kwargs)
        elif types == (tuple,):
            flags.DEFINE_list(name, default, help_, **kwargs)
        else:  # str, or a value that is one of several types (n_buckets: an int or a pair), parsed by parse_value
            flags.DEFINE_string(name, default, help_, **kwargs)
        names.append(name)
    return names


def parse_value(cls: type, name: str, value: Any) -> Any:
    """The field value a flag's value stands for (lists become tuples of the field's element type); a value that
    cannot be one raises ValueError naming the flag."""
    annotation = typing.get_type_hints(cls)[name]
    types = _base_types(annotation)
    if isinstance(value, str) and int in types and tuple in types:  # an int or a pair, written "8" or "8,4"
        parts = [p for p in value.split(",") if p.strip()]
        numbers = _integers(name, parts)
        if not numbers:
            raise ValueError(f"--{name}={value!r} is invalid: expected an integer or two integers 'f1,f2' (or leave "
                             "it unset for the default).")
        return numbers[0] if len(numbers) == 1 else numbers
    if isinstance(value, list):
        return _integers(name, value) if _element_type(annotation) is int else tuple(value)
    return value


def _integers(name: str, values) -> tuple:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name}={','.join(values)} is invalid: expected integers separated by commas.") from None
