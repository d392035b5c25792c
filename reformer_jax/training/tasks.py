"""What a run trains: the task, the model fields it sets and the data it reads.

  lm        next-token language model (causal), on text or the copy task: the default
  mlm       masked-byte language model (bidirectional), on text: `data.mask_tokens` at `mask_rate`
  classify  sequence classification (bidirectional, a classification head), on ListOps (`listops`)

`model_fields(task)` are the ModelConfig fields the task needs (a command line's own model flags still win);
`check(config, task, dataset)` refuses a model that cannot train on the task, before anything compiles.
"""

from __future__ import annotations

from typing import Any, Dict

from reformer_jax.errors import SettingError
from reformer_jax.model.config import ModelConfig
from reformer_jax.training import data, listops

TASKS = ("lm", "mlm", "classify")
DATASETS_OF = {"lm": ("tiny_shakespeare", "text", "synthetic"), "mlm": ("tiny_shakespeare", "text"),
               "classify": ("listops",)}
# A bidirectional model looks one chunk ahead as it looks one back (Hugging Face's encoders' setting).
_BIDIRECTIONAL = {"causal": False, "n_chunks_after": 1, "local_n_chunks_after": 1}


def model_fields(task: str) -> Dict[str, Any]:
    """The ModelConfig fields of `task`: none for "lm"; a bidirectional model with the [MASK] id in its vocabulary
    for "mlm"; a bidirectional classifier over ListOps' tokens and classes for "classify"."""
    if task == "mlm":
        return {**_BIDIRECTIONAL, "vocab_size": data.MLM_VOCAB_SIZE}
    if task == "classify":
        return {**_BIDIRECTIONAL, "head": "classification", "num_labels": listops.N_CLASSES,
                "vocab_size": listops.VOCAB_SIZE}
    return {}


def check_options(task: str, dataset: str, mask_rate: float, owner: str = "TrainOptions") -> None:
    """A SettingError (one line) for a task the run cannot train: unknown, on a dataset it does not read, or
    a masking rate outside (0, 1)."""
    if task not in TASKS:
        raise SettingError(owner, "task", task, f"is invalid: expected one of {', '.join(TASKS)}.")
    if dataset not in DATASETS_OF[task]:
        wanted = " or ".join(DATASETS_OF[task])
        raise SettingError(owner, "dataset", dataset, f"is not a {task} dataset: the {task} task reads {wanted}"
                           + ("; ListOps is --task=classify's." if dataset == "listops" else "."))
    if not (isinstance(mask_rate, (int, float)) and 0 < mask_rate < 1):
        raise SettingError(owner, "mask_rate", mask_rate, "is invalid: expected a fraction in (0, 1), e.g. 0.15.")


def check_model(config: ModelConfig, task: str) -> None:
    """A SettingError naming the model field that does not fit `task` (e.g. a causal model for --task=mlm)."""
    want = {"lm": ("lm", True), "mlm": ("lm", False), "classify": ("classification", False)}[task]
    if config.causal != want[1]:
        raise SettingError("ModelConfig", "causal", config.causal, f"does not fit the {task} task: it needs "
                           f"causal={want[1]}.")
    if config.head != want[0]:
        raise SettingError("ModelConfig", "head", config.head, f"does not fit the {task} task: it needs "
                           f"head={want[0]!r}.")
    needed = {"mlm": data.MLM_VOCAB_SIZE, "classify": listops.VOCAB_SIZE}.get(task)
    if needed and config.vocab_size < needed:
        raise SettingError("ModelConfig", "vocab_size", config.vocab_size, f"is too small for the {task} task: "
                           f"use {needed}.")
    if task == "classify" and config.num_labels != listops.N_CLASSES:
        raise SettingError("ModelConfig", "num_labels", config.num_labels, f"does not fit ListOps' "
                           f"{listops.N_CLASSES} classes.")
