"""Hugging Face Reformer checkpoints -> (ModelConfig, params): ReformerModelWithLMHead (converted from trax) and
the encoders ReformerForMaskedLM, ReformerForSequenceClassification and ReformerForQuestionAnswering.

    python -m reformer_jax.convert --hf_dir=DIR --out=OUT    # DIR: config.json + model.safetensors or
                                                             #      pytorch_model.bin, downloaded by the user
    python main.py --init_from=OUT ...                       # train or fine-tune from the converted weights

`from_hf(state_dict, hf_config)` needs only numpy arrays (or anything `np.asarray` takes, e.g. CPU torch tensors)
and a dict of the Hugging Face config; torch is needed only to read a `pytorch_model.bin`.

Mapping (Hugging Face Linear weights are [out, in]; ours are [in, ...]):
  reformer.embeddings.word_embeddings.weight [V, d]               -> embed
  reformer.embeddings.position_embeddings.weights.{0,1}            -> positions/axial_{0,1} (same layout)
  reformer.embeddings.position_embeddings.embedding.weight         -> positions/pos_embed
  reformer.encoder.layers.i.attention.layer_norm.{weight,bias}     -> layers/attention[type]/norm/{scale,bias}[j]
  ...self_attention.{query_key,query,key,value}.weight [h k, d]    -> {qk,q,k,v}[j] [d, h, k]
  ...attention.output.dense.weight [d, h k]                        -> out[j] [h, k, d]
  ...feed_forward.layer_norm, dense.dense, output.dense            -> layers/feed_forward/{norm,wi,bi,wo,bo}[i]
  reformer.encoder.layer_norm.{weight,bias} [2d]                   -> final_norm_{scale,bias}
  lm_head.decoder.{weight,bias} [V, 2d]                            -> head_kernel [2d, V], head_bias
  classifier.dense.{weight [d, 2d], bias}                          -> classifier/dense/{kernel [2d, d], bias}
  classifier.out_proj.{weight [C, d], bias}                        -> classifier/out_proj/{kernel [d, C], bias}
  qa_outputs.{weight [2, 2d], bias}                                -> qa_outputs/{kernel [2d, 2], bias}
where j counts the layers of layer i's type. `lm_head.bias` is accepted and not used: Hugging Face's forward
adds `lm_head.decoder.bias` (older checkpoints tie the two). The head (ModelConfig.head) is read from the state
dict's head tensors, or without a state dict from the config's `architectures`; `is_decoder` False makes the model
bidirectional (causal=False), with `lsh_num_chunks_after` / `local_num_chunks_after` chunks of look-ahead.

Hash rotations: Hugging Face's LSH layers draw random rotations at every call. With `hash_seed` set in its config,
every draw is torch.manual_seed(hash_seed) then torch.randn([h, k, num_hashes, sum(num_buckets factors) / 2]) in
float32 (on the CPU), the same for every call and every LSH layer. `hf_lsh_rotations` computes that draw (it needs
torch) and `save_converted` records it as OUT/lsh_rotations.npy, one copy per LSH layer stacked,
[LSH layers, h, k, n_hashes, f / 2]: the `lsh_rotations` argument of `ReformerLM` and of decoding as it is, so a
reader hands it over unchanged. With hash_seed None (the published checkpoints) nothing is recorded and every
reader draws its own rotations from its seed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from reformer_jax.errors import setting
from reformer_jax.model.config import ModelConfig

CONFIG_FILE = "config.json"  # our ModelConfig, written next to the orbax params
TOKENIZER_FILE = "tokenizer.json"  # the checkpoint's tokenization (reformer_jax.tokenizers.from_dict)
PARAMS_DIR = "params"
ROTATIONS_FILE = "lsh_rotations.npy"  # a seeded checkpoint's hash rotations (see the module docstring)
HF_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu"}  # jax.nn.gelu is the tanh form, Hugging Face's gelu_new


class ConversionError(ValueError):
    """A checkpoint or config this converter cannot map, with the name of what is wrong."""


def _get(hf_config: Mapping[str, Any], name: str, default: Any = None) -> Any:
    return hf_config.get(name, default) if isinstance(hf_config, Mapping) else getattr(hf_config, name, default)


HEAD_OF_ARCHITECTURE = {"ReformerModelWithLMHead": "lm", "ReformerForMaskedLM": "lm",
                        "ReformerForSequenceClassification": "classification",
                        "ReformerForQuestionAnswering": "question_answering"}


def _head_of_config(hf_config: Any) -> str:
    """ModelConfig.head from the config's `architectures` (the language-model head when it names none we know)."""
    names = [HEAD_OF_ARCHITECTURE[a] for a in (_get(hf_config, "architectures") or []) if a in HEAD_OF_ARCHITECTURE]
    return names[0] if names else "lm"


def _head_of_state_dict(state_dict: Mapping[str, Any]) -> str:
    """ModelConfig.head from the head tensors a state dict holds."""
    if any(name.startswith("classifier.") for name in state_dict):
        return "classification"
    if any(name.startswith("qa_outputs.") for name in state_dict):
        return "question_answering"
    return "lm"


def _num_labels(hf_config: Any) -> int:
    labels = _get(hf_config, "num_labels")
    if labels is None:
        labels = len(_get(hf_config, "id2label") or {}) or 2
    return int(labels)


def _classifier_dropout(hf_config: Any) -> Optional[float]:
    """Hugging Face's classifier_dropout (None: the head takes hidden_dropout_prob, as our `dropout`)."""
    rate = _get(hf_config, "classifier_dropout")
    return None if rate is None else float(rate)


def config_from_hf(hf_config: Any, head: Optional[str] = None) -> ModelConfig:
    """Our ModelConfig for a Hugging Face ReformerConfig (object or dict); unsupported settings raise. `head`
    ("lm", "classification", "question_answering"; default: from the config's `architectures`) is the model's head,
    which `from_hf` reads from the state dict."""
    attn_layers = tuple(_get(hf_config, "attn_layers"))
    if not attn_layers or any(t not in ("lsh", "local") for t in attn_layers):
        raise ConversionError(f"attn_layers={list(attn_layers)} is not supported: expected a non-empty list of "
                              "'lsh' and 'local'.")
    head = head or _head_of_config(hf_config)
    if _get(hf_config, "is_decoder", True):
        for name in ("lsh_num_chunks_after", "local_num_chunks_after"):
            if _get(hf_config, name, 0):
                raise ConversionError(f"{name}={_get(hf_config, name)} with is_decoder=True is not supported: a causal "
                                      "model never looks ahead (0), or set is_decoder=False for a bidirectional one.")
    n_buckets = _get(hf_config, "num_buckets")
    if "lsh" in attn_layers and n_buckets is None:
        raise ConversionError("num_buckets=None: Hugging Face picks it from the first input's length; set it in "
                              "config.json (e.g. the value the model was trained with).")
    if isinstance(n_buckets, (list, tuple)):
        n_buckets = int(n_buckets[0]) if len(n_buckets) == 1 else tuple(int(f) for f in n_buckets)
    activation = _get(hf_config, "hidden_act", "relu")
    if activation not in HF_ACTIVATIONS:
        raise ConversionError(f"hidden_act={activation!r} is not supported; expected one of "
                              f"{', '.join(map(repr, HF_ACTIVATIONS))}.")
    axial = bool(_get(hf_config, "axial_pos_embds", True))
    axial_shape = tuple(int(s) for s in _get(hf_config, "axial_pos_shape")) if axial else None
    if axial and len(axial_shape) != 2:
        raise ConversionError(f"axial_pos_shape={list(axial_shape)} is not supported: expected two factors.")
    kinds = set(attn_layers)
    try:
        return ModelConfig(
            vocab_size=int(_get(hf_config, "vocab_size")), d_model=int(_get(hf_config, "hidden_size")),
            n_heads=int(_get(hf_config, "num_attention_heads")), d_head=int(_get(hf_config, "attention_head_size")),
            d_ff=int(_get(hf_config, "feed_forward_size")), n_layers=len(attn_layers),
            max_len=math.prod(axial_shape) if axial else int(_get(hf_config, "max_position_embeddings")),
            attention=attn_layers[0] if len(kinds) == 1 else "lsh",
            attn_layers=attn_layers if len(kinds) > 1 else None, reversible=True,
            n_hashes=int(_get(hf_config, "num_hashes", 1)), chunk_len=int(_get(hf_config, "lsh_attn_chunk_length")),
            n_buckets=n_buckets, n_chunks_before=int(_get(hf_config, "lsh_num_chunks_before")),
            n_chunks_after=int(_get(hf_config, "lsh_num_chunks_after", 0)),
            local_chunk_len=int(_get(hf_config, "local_attn_chunk_length")),
            local_n_chunks_before=int(_get(hf_config, "local_num_chunks_before")),
            local_n_chunks_after=int(_get(hf_config, "local_num_chunks_after", 0)),
            local_attention_dropout=float(_get(hf_config, "local_attention_probs_dropout_prob", 0.0)),
            sequential_rounds=False, causal=bool(_get(hf_config, "is_decoder", True)),
            ff_chunk_len=int(_get(hf_config, "chunk_size_feed_forward", 0) or 0),
            dropout=float(_get(hf_config, "hidden_dropout_prob", 0.0)),
            attention_dropout=float(_get(hf_config, "lsh_attention_probs_dropout_prob", 0.0)),
            pos_embedding="axial" if axial else "absolute", axial_shape=axial_shape,
            axial_dims=tuple(int(d) for d in _get(hf_config, "axial_pos_embds_dim")) if axial else None,
            output_head="concat", tie_embeddings=False, ff_activation=HF_ACTIVATIONS[activation],
            layer_norm_eps=float(_get(hf_config, "layer_norm_eps", 1e-12)), head=head,
            num_labels=_num_labels(hf_config) if head == "classification" else 2,
            classifier_dropout=_classifier_dropout(hf_config) if head == "classification" else None)
    except ValueError as error:
        raise ConversionError(f"the Hugging Face config maps to an invalid ModelConfig: {error}") from error


def _expected_tensors(config: ModelConfig) -> Dict[str, Tuple[Tuple[int, ...], Tuple[Any, ...], str]]:
    """Hugging Face name -> (its shape, our parameter path, how to transform: 'same', 'T', 'in', 'out')."""
    d, h, k, f, v = config.d_model, config.n_heads, config.d_head, config.d_ff, config.vocab_size
    mixed = config.attn_layers is not None
    table: Dict[str, Tuple[Tuple[int, ...], Tuple[Any, ...], str]] = {
        "reformer.embeddings.word_embeddings.weight": ((v, d), ("embed",), "same"),
        "reformer.encoder.layer_norm.weight": ((2 * d,), ("final_norm_scale",), "same"),
        "reformer.encoder.layer_norm.bias": ((2 * d,), ("final_norm_bias",), "same"),
    }
    if config.head == "lm":
        table["lm_head.decoder.weight"] = ((v, 2 * d), ("head_kernel",), "T")
        table["lm_head.decoder.bias"] = ((v,), ("head_bias",), "same")
    elif config.head == "classification":
        c = config.num_labels
        table["classifier.dense.weight"] = ((d, 2 * d), ("classifier", "dense", "kernel"), "T")
        table["classifier.dense.bias"] = ((d,), ("classifier", "dense", "bias"), "same")
        table["classifier.out_proj.weight"] = ((c, d), ("classifier", "out_proj", "kernel"), "T")
        table["classifier.out_proj.bias"] = ((c,), ("classifier", "out_proj", "bias"), "same")
    else:
        table["qa_outputs.weight"] = ((2, 2 * d), ("qa_outputs", "kernel"), "T")
        table["qa_outputs.bias"] = ((2,), ("qa_outputs", "bias"), "same")
    if config.pos_embedding == "axial":
        (l1, l2), (d1, d2) = config.axial_shape, config.axial_dims
        pos = "reformer.embeddings.position_embeddings.weights."
        table[pos + "0"] = ((l1, 1, d1), ("positions", "axial_0"), "same")
        table[pos + "1"] = ((1, l2, d2), ("positions", "axial_1"), "same")
    else:
        table["reformer.embeddings.position_embeddings.embedding.weight"] = (
            (config.max_len, d), ("positions", "pos_embed"), "same")
    for i, kind in enumerate(config.layer_types):
        j = config.layer_types[:i].count(kind)
        attn = ("layers", "attention") + ((kind,) if mixed else ())
        ff = ("layers", "feed_forward")
        pre = f"reformer.encoder.layers.{i}."
        table[pre + "attention.layer_norm.weight"] = ((d,), attn + ("norm", "scale", j), "same")
        table[pre + "attention.layer_norm.bias"] = ((d,), attn + ("norm", "bias", j), "same")
        names = {"query": "q", "key": "k", "value": "v"} if kind == "local" else {"query_key": "qk", "value": "v"}
        for hf_name, ours in names.items():
            table[pre + f"attention.self_attention.{hf_name}.weight"] = ((h * k, d), attn + (ours, j), "in")
        table[pre + "attention.output.dense.weight"] = ((d, h * k), attn + ("out", j), "out")
        table[pre + "feed_forward.layer_norm.weight"] = ((d,), ff + ("norm", "scale", i), "same")
        table[pre + "feed_forward.layer_norm.bias"] = ((d,), ff + ("norm", "bias", i), "same")
        table[pre + "feed_forward.dense.dense.weight"] = ((f, d), ff + ("wi", i), "T")
        table[pre + "feed_forward.dense.dense.bias"] = ((f,), ff + ("bi", i), "same")
        table[pre + "feed_forward.output.dense.weight"] = ((d, f), ff + ("wo", i), "T")
        table[pre + "feed_forward.output.dense.bias"] = ((d,), ff + ("bo", i), "same")
    return table


IGNORED = {"lm_head.bias"}  # not used by Hugging Face's forward (see the module docstring)


def from_hf(state_dict: Mapping[str, Any], hf_config: Any) -> Tuple[ModelConfig, Dict[str, Any]]:
    """(ModelConfig, params) of a Hugging Face Reformer state dict (ReformerModelWithLMHead, ReformerForMaskedLM,
    ReformerForSequenceClassification or ReformerForQuestionAnswering: the head is read from the state dict);
    params as from `init_params`.

    Every tensor is mapped with a shape check; an unknown, missing or misshapen tensor raises ConversionError
    naming it.
    """
    import jax
    import jax.numpy as jnp

    from reformer_jax.model.reformer_lm import init_params

    config = config_from_hf(hf_config, head=_head_of_state_dict(state_dict))
    table = _expected_tensors(config)
    unknown = sorted(set(state_dict) - set(table) - IGNORED)
    if unknown:
        raise ConversionError(f"unknown tensor(s) in the checkpoint: {', '.join(unknown[:5])}"
                              f"{' ...' if len(unknown) > 5 else ''}; expected the state dict of a Reformer with one "
                              "head (language model, classification or question answering).")
    missing = sorted(set(table) - set(state_dict))
    if missing:
        raise ConversionError(f"missing tensor(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}.")
    shapes = jax.eval_shape(init_params, config, jax.random.key(0))
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    for name, (shape, path, how) in table.items():
        value = np.asarray(state_dict[name].detach().cpu().numpy() if hasattr(state_dict[name], "detach")
                           else state_dict[name], np.float32)
        if value.shape != shape:
            raise ConversionError(f"tensor {name} has shape {value.shape}; expected {shape} for this config.")
        if how == "T":
            value = value.T
        elif how == "in":  # [h k, d] -> [d, h, k]
            value = value.T.reshape(config.d_model, config.n_heads, config.d_head)
        elif how == "out":  # [d, h k] -> [h, k, d]
            value = value.T.reshape(config.n_heads, config.d_head, config.d_model)
        node = params
        for key in path[:-1]:
            node = node[key]
        if isinstance(path[-1], int):
            node[path[-1]] = value
        else:
            node[path[-1]] = value.reshape(node[path[-1]].shape)
    return config, jax.tree.map(lambda x: jnp.asarray(x, config.params_dtype), params)


def lsh_rotations_shape(config: ModelConfig) -> Tuple[int, ...]:
    """[LSH layers, h, k, n_hashes, sum(n_buckets factors) / 2]: the shape of a model's explicit hash rotations."""
    factors = config.n_buckets if isinstance(config.n_buckets, tuple) else (config.n_buckets or 0,)
    return (config.layer_types.count("lsh"), config.n_heads, config.d_head, config.n_hashes,
            sum(int(f) // 2 for f in factors))


def hf_lsh_rotations(hf_config: Any) -> Optional[np.ndarray]:
    """The hash rotations a Hugging Face Reformer whose config sets `hash_seed` draws at every call, one copy per
    LSH layer: [LSH layers, h, k, n_hashes, sum(n_buckets factors) / 2] float32, as `ReformerLM` takes them. None
    when hash_seed is None (each call draws anew) or no layer is LSH.

    Hugging Face reseeds torch's global generator with hash_seed and draws torch.randn of [h, k, n_hashes, f / 2] in
    the attention's dtype (float32); the same stream is drawn here from a generator of our own, so torch's global
    state is left as it was. The draw is the one on the CPU (a CUDA device's generator gives other numbers).
    Raises ImportError without torch.
    """
    config = config_from_hf(hf_config)
    seed = _get(hf_config, "hash_seed")
    if seed is None or not config.uses("lsh"):
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConversionError(f"hash_seed={seed!r} is not supported: expected an integer or null.")
    import torch

    shape = lsh_rotations_shape(config)
    draw = torch.randn(shape[1:], generator=torch.Generator(device="cpu").manual_seed(seed), dtype=torch.float32)
    return np.stack([draw.numpy()] * shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Files


def load_hf_dir(hf_dir: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(state_dict of numpy arrays, config dict) from a Hugging Face model directory."""
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{setting('hf_dir')}={hf_dir} has no config.json; expected a Hugging Face model directory "
                              "(config.json and model.safetensors or pytorch_model.bin).")
    hf_config = json.loads(config_path.read_text())
    if hf_config.get("model_type") != "reformer":
        raise ConversionError(f"{config_path} has model_type={hf_config.get('model_type')!r}; expected 'reformer'.")
    safetensors, binary = hf_dir / "model.safetensors", hf_dir / "pytorch_model.bin"
    if safetensors.is_file():
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ConversionError(f"{safetensors} needs the safetensors package: pip install safetensors.") from error
        return load_file(str(safetensors)), hf_config
    if binary.is_file():
        try:
            import torch
        except ImportError as error:
            raise ConversionError(f"{binary} is a PyTorch pickle and needs torch to read; install torch or convert "
                                  "it to model.safetensors.") from error
        return torch.load(str(binary), map_location="cpu", weights_only=True), hf_config
    raise ConversionError(f"{setting('hf_dir')}={hf_dir} has neither model.safetensors nor pytorch_model.bin.")


SPIECE_FILE = "spiece.model"  # a Hugging Face Reformer's sentencepiece vocabulary (crime-and-punishment)


def tokenizer_for_hf(hf_config: Mapping[str, Any], hf_dir: Any = None):
    """The tokenizer of a Hugging Face Reformer checkpoint: its spiece.model where `hf_dir` has one (whose
    vocabulary must be the model's), else bytes after `vocab_size - 256` special ids (enwik8: byte + 2), else
    None (a vocabulary of ids only)."""
    from reformer_jax import tokenizers

    vocab_size = int(_get(hf_config, "vocab_size"))
    spiece = Path(hf_dir) / SPIECE_FILE if hf_dir is not None else None
    if spiece is not None and spiece.is_file():
        try:
            tokenizer = tokenizers.SentencePieceTokenizer(spiece.read_bytes())
        except tokenizers.TokenizerError as error:
            raise ConversionError(f"{spiece}: {error}") from error
        except Exception as error:  # sentencepiece's own parse error
            raise ConversionError(f"{spiece} is not a sentencepiece model ({error}).") from error
        if tokenizer.vocab_size != vocab_size:
            raise ConversionError(f"{spiece} has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                                  f"{vocab_size}; they belong to different checkpoints.")
        return tokenizer
    return tokenizers.for_hf_vocabulary(vocab_size, _get(hf_config, "pad_token_id", 0))


def save_converted(config: ModelConfig, params: Any, out: Path, tokenizer: Any = None,
                   lsh_rotations: Optional[np.ndarray] = None) -> None:
    """Write OUT/config.json, OUT/tokenizer.json (when the vocabulary is text), OUT/lsh_rotations.npy (when given:
    [LSH layers, h, k, n_hashes, f / 2], see `hf_lsh_rotations`) and OUT/params (orbax) into a temporary directory,
    then rename it to OUT."""
    import orbax.checkpoint as ocp

    out = Path(out).absolute()
    if out.exists():
        raise ConversionError(f"{setting('out')}={out} exists; pass a new directory (nothing is overwritten).")
    if lsh_rotations is not None and tuple(np.shape(lsh_rotations)) != lsh_rotations_shape(config):
        raise ConversionError(f"lsh_rotations have shape {tuple(np.shape(lsh_rotations))}; expected "
                              f"{lsh_rotations_shape(config)} ([LSH layers, h, k, n_hashes, f / 2]) for this config.")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / PARAMS_DIR, params)
        (staging / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            (staging / TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_dict(), indent=2, sort_keys=True) + "\n")
        if lsh_rotations is not None:
            np.save(staging / ROTATIONS_FILE, np.asarray(lsh_rotations, np.float32))
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def load_converted_config(directory: Path) -> ModelConfig:
    """The ModelConfig saved by `save_converted`; a missing or unreadable file raises ConversionError."""
    path = Path(directory) / CONFIG_FILE
    if not (Path(directory) / PARAMS_DIR).is_dir() or not path.is_file():
        raise ConversionError(f"{directory} is not a converted checkpoint: expected {CONFIG_FILE} and {PARAMS_DIR}/ "
                              "written by `python -m reformer_jax.convert`.")
    try:
        return config_from_fields(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as error:
        raise ConversionError(f"{path} does not hold a valid ModelConfig: {error}") from error


def load_converted_tokenizer(directory: Path):
    """The tokenizer recorded by `save_converted` (None where the checkpoint's vocabulary is not text)."""
    from reformer_jax import tokenizers

    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        return tokenizers.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path} is unreadable ({error}).") from error


def load_converted_rotations(directory: Path, config: ModelConfig) -> Optional[np.ndarray]:
    """The hash rotations recorded by `save_converted`, [LSH layers, h, k, n_hashes, f / 2] float32, or None where
    none were (the readers then draw their own); an unreadable or misshapen file raises ConversionError."""
    path = Path(directory) / ROTATIONS_FILE
    if not path.is_file():
        return None
    try:
        rotations = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path} is unreadable ({error}).") from error
    if rotations.shape != lsh_rotations_shape(config) or rotations.dtype != np.float32:
        raise ConversionError(f"{path} holds {rotations.dtype} {rotations.shape}; expected float32 "
                              f"{lsh_rotations_shape(config)} ([LSH layers, h, k, n_hashes, f / 2]) for its "
                              f"{CONFIG_FILE}.")
    return rotations


def config_from_fields(fields: Dict[str, Any]) -> ModelConfig:
    """A ModelConfig from its fields as JSON saved them (lists where the config holds tuples)."""
    fields = dict(fields)
    for name in ("n_buckets", "axial_shape", "axial_dims", "attn_layers"):
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    return ModelConfig(**fields)


def load_converted_params(directory: Path, target: Any) -> Any:
    """The converted params, restored into the structure, shapes and shardings of `target`."""
    import jax
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(Path(directory).absolute() / PARAMS_DIR, abstract)
