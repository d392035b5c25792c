"""ModelConfig: every model knob in one frozen, hashable dataclass.

The four variants of the seed's memory experiments are presets of this one config, so benchmarks sweep configs,
not code paths:

| preset        | attention | residual   | feed-forward, output head | heads           |
| ------------- | --------- | ---------- | ------------------------- | --------------- |
| "transformer" | full      | ordinary   | whole                     | all at once     |
| "lsh"         | lsh       | ordinary   | whole                     | all at once     |
| "reversible"  | full      | reversible | whole                     | all at once     |
| "reformer"    | lsh       | reversible | chunked (256 positions)   | one at a time   |

LSH attention processes hash rounds one at a time by default (`sequential_rounds`) in every preset.

Defaults are the seed's setup: byte vocabulary (256 bytes + pad/eos/bos = 259), d_model 512, 8 heads of 64,
d_ff 2048, 6 layers, length 4096, chunk 64, 8 hash rounds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple, Union

import jax.numpy as jnp

from reformer_jax.errors import SettingError

ATTENTION_TYPES = ("full", "lsh", "local")
POS_EMBEDDINGS = ("absolute", "axial")
OUTPUT_HEADS = ("mean", "concat")
HEADS = ("lm", "classification", "question_answering")
FF_ACTIVATIONS = ("relu", "gelu")
DTYPES = ("float32", "bfloat16", "float16")
PRESETS = ("transformer", "lsh", "reversible", "reformer")

# The recommended exact-reversal grid (ModelConfig.stream_grid_bits, opt-in): streams are multiples of 2^-k and
# sums stay exact while |stream| < 2^(24 - k). k = 16: exact below 256 with a step of 1.5e-5. Measured: the
# largest |stream| is 23 at initialisation after 48 layers (d_model 512, length 1024) and peaked at 52 in a
# 300-step run at main.py's default sizes, so 256 leaves 5x headroom (k = 18 would leave ~1x), while the step
# stays 4000x below the embeddings' RMS of 0.06.
RECOMMENDED_STREAM_GRID_BITS = 16
# A finer grid leaves no exact range above |stream| ~ 1 (float32 has 24 significant bits).
MAX_STREAM_GRID_BITS = 23

# Above this many buckets per round the default bucket count is factorised into two factors (trax, Hugging Face),
# so the hash projection has f1/2 + f2/2 columns instead of n_buckets/2.
FACTORISE_BUCKETS_ABOVE = 128


def _fail(field: str, value: Any, valid: str) -> None:
    raise SettingError("ModelConfig", field, value, f"is invalid: {valid}.")


def _factor_pair(n: int) -> Optional[Tuple[int, int]]:
    """The two even factors (f1 >= f2) of n closest to sqrt(n), or None if n has no such split."""
    for f2 in range(int(math.isqrt(n)), 1, -1):
        if n % f2 == 0 and f2 % 2 == 0 and (n // f2) % 2 == 0:
            return (n // f2, f2)
    return None


def default_n_buckets(seq_len: int, chunk_len: int) -> Union[int, Tuple[int, int]]:
    """trax's default bucket count 2 * max(1, seq_len // chunk_len), factorised above 128 buckets.

    >>> default_n_buckets(4096, 64), default_n_buckets(16384, 64)
    (128, (32, 16))
    """
    n = 2 * max(1, seq_len // chunk_len)
    if n > FACTORISE_BUCKETS_ABOVE:
        pair = _factor_pair(n)
        if pair is not None:
            return pair
    return n


def default_axial_shape(length: int) -> Tuple[int, int]:
    """(l1, l2) with l1 * l2 = length, l1 the largest divisor not above sqrt(length): 4096 -> (64, 64)."""
    for l1 in range(int(math.isqrt(length)), 0, -1):
        if length % l1 == 0:
            return (l1, length // l1)
    raise AssertionError("unreachable: 1 divides every length")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """All model hyper-parameters. Frozen and hashable, so it can be a static argument of `jax.jit`.

    Attributes:
      vocab_size: V, number of token ids (259 = 256 bytes + pad 0, eos 1, bos 2).
      d_model: d, width of each residual stream.
      n_heads: h, attention heads.
      d_head: k, width of one head; None means d_model // n_heads.
      d_ff: f, hidden width of the feed-forward block.
      n_layers: number of (attention, feed-forward) layer pairs.
      max_len: longest sequence the model accepts (size of the positional embedding).
      attention: every layer's attention: "full" (shared-QK full attention), "lsh" (LSH attention) or "local"
        (chunked attention with separate q, k, v; Hugging Face / trax). Ignored when `attn_layers` is given.
      attn_layers: one attention type per layer, e.g. ("local", "lsh") * 6 (the Hugging Face checkpoints), or
        None for `attention` in every layer. Mixed stacks scan over the shortest repeating group of layers.
      reversible: True for RevNet residual streams (y1 = x1 + F(x2), y2 = x2 + G(y1)).
      n_hashes: n_r, hash rounds of LSH attention.
      chunk_len: c, chunk length of LSH attention (the "bucket size").
      n_buckets: buckets per round: an even int, a tuple (f1, f2) of even ints for factorised buckets
        (f1 * f2 buckets), or None for trax's default 2 * max(1, seq_len // chunk_len), factorised above 128.
      n_chunks_before: chunks each LSH chunk looks back to (0 allowed).
      n_chunks_after: chunks each LSH chunk looks ahead to (bidirectional models only: causal=False).
      sequential_rounds: compute LSH attention one hash round at a time (forward and backward), so its memory
        does not grow with n_hashes; the same result up to float rounding. False: all rounds at once.
      sequential_heads: compute the attention block one head at a time under its own custom_vjp (projections,
        attention and output projection per head, recomputed in the backward pass), so no [b, h, l, k] tensor is
        ever alive; the same result up to float rounding (attention dropout draws its masks per head). Local
        attention layers always run all heads at once (their separate q, k, v have no per-head path).
      local_chunk_len: chunk length of local attention layers.
      local_n_chunks_before: chunks each local chunk looks back to (0 allowed).
      local_n_chunks_after: chunks each local chunk looks ahead to (bidirectional models only: causal=False).
      local_attention_dropout: dropout rate on the attention weights of local layers.
      causal: causal (language-model) masking; False for a bidirectional encoder (`reformer_jax.model.heads`).
      head: what the model predicts from the final hidden states: "lm" (a token at every position: next-token with
        causal=True, masked tokens with causal=False), "classification" (num_labels classes from the first
        position, Hugging Face's ReformerForSequenceClassification) or "question_answering" (start / end logits
        at every position). The last two need causal=False.
      num_labels: classes of the "classification" head.
      classifier_dropout: dropout rate of the "classification" head; None takes `dropout` (Hugging Face's
        classifier_dropout, which falls back to hidden_dropout_prob).
      ff_chunk_len: process the feed-forward block over chunks of this many positions (0 = all at once; a
        length it does not divide gets a zero-padded last chunk).
      output_chunk_len: compute the output projection and the loss over chunks of this many positions, so the
        [b, l, V] logits are never alive whole (0, or a length it does not divide: all positions at once).
      dropout: residual and embedding dropout rate.
      attention_dropout: dropout rate on attention weights.
      pos_embedding: "absolute" ([max_len, d] table) or "axial" (two small tables, see `axial_shape`).
      axial_shape: (l1, l2) with l1 * l2 = max_len; None derives it from max_len.
      axial_dims: (d1, d2) with d1 + d2 = d_model; None means (d_model // 2, d_model - d_model // 2).
      output_head: "mean" of the two reversible streams (tied to the embedding when tie_embeddings) or "concat"
        [y1, y2] into an untied [2d, V] projection (trax / Hugging Face).
      tie_embeddings: share the token embedding with the output projection ("mean" head only).
      ff_activation: "relu" (trax, Hugging Face default) or "gelu".
      layer_norm_eps: epsilon of every LayerNorm (trax: 1e-6; Hugging Face checkpoints: 1e-12).
      scan_layers: run a non-reversible stack as one `lax.scan` (compiles once per model); False unrolls it
        into a Python loop so XLA's schedule shows each layer's stored activations separately.
      dtype: compute dtype of the blocks ("float32" | "bfloat16" | "float16"); residual streams stay float32.
      param_dtype: dtype the parameters are stored in.
      stream_grid_bits: k > 0 keeps a reversible stack's float32 streams on the grid of multiples of 2^-k (the
        embeddings and every block output rounded to it, gradients straight-through), so the backward pass
        recovers each layer's inputs exactly while |stream| < 2^(24 - k) (see `reformer_jax.kernels.reversible`);
        0 = off (every preset; 16 recommended). Costs: block outputs move by up to 2^-(k+1), and results that
        differ in the last bits (another summation order) can differ by a whole grid step. Ignored when
        reversible=False.
    """

    vocab_size: int = 259
    d_model: int = 512
    n_heads: int = 8
    d_head: Optional[int] = None
    d_ff: int = 2048
    n_layers: int = 6
    max_len: int = 4096
    attention: str = "lsh"
    attn_layers: Optional[Tuple[str, ...]] = None
    reversible: bool = True
    n_hashes: int = 8
    chunk_len: int = 64
    n_buckets: Union[int, Tuple[int, int], None] = None
    n_chunks_before: int = 1
    n_chunks_after: int = 0
    sequential_rounds: bool = True
    sequential_heads: bool = True
    local_chunk_len: int = 64
    local_n_chunks_before: int = 1
    local_n_chunks_after: int = 0
    local_attention_dropout: float = 0.0
    causal: bool = True
    ff_chunk_len: int = 0
    output_chunk_len: int = 0
    dropout: float = 0.1
    attention_dropout: float = 0.0
    pos_embedding: str = "axial"
    axial_shape: Optional[Tuple[int, int]] = None
    axial_dims: Optional[Tuple[int, int]] = None
    output_head: str = "mean"
    tie_embeddings: bool = True
    ff_activation: str = "relu"
    layer_norm_eps: float = 1e-6
    scan_layers: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    stream_grid_bits: int = 0
    head: str = "lm"
    num_labels: int = 2
    classifier_dropout: Optional[float] = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        # Sequences become tuples so the config stays hashable.
        for name in ("n_buckets", "axial_shape", "axial_dims", "attn_layers"):
            value = getattr(self, name)
            if isinstance(value, list):
                set_(name, tuple(value))
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_len", "n_hashes", "chunk_len",
                     "local_chunk_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "expected a positive integer")
        for name in ("n_chunks_before", "n_chunks_after", "ff_chunk_len", "output_chunk_len", "local_n_chunks_before",
                     "local_n_chunks_after", "num_labels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(name, value, "expected an integer >= 0")
        bits = self.stream_grid_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= MAX_STREAM_GRID_BITS:
            _fail("stream_grid_bits", bits, f"expected an integer in [0, {MAX_STREAM_GRID_BITS}] (0 = off; "
                  f"{RECOMMENDED_STREAM_GRID_BITS} is exact while |stream| < "
                  f"{2 ** (24 - RECOMMENDED_STREAM_GRID_BITS)})")
        if self.d_head is None:
            if self.d_model % self.n_heads:
                _fail("d_head", None, f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                      "pass d_head explicitly or choose n_heads dividing d_model")
            set_("d_head", self.d_model // self.n_heads)
        elif isinstance(self.d_head, bool) or not isinstance(self.d_head, int) or self.d_head < 1:
            _fail("d_head", self.d_head, "expected a positive integer or None (= d_model // n_heads)")
        self._check_choice("attention", ATTENTION_TYPES)
        self._check_attn_layers()
        self._check_choice("pos_embedding", POS_EMBEDDINGS)
        self._check_choice("output_head", OUTPUT_HEADS)
        self._check_choice("ff_activation", FF_ACTIVATIONS)
        self._check_choice("dtype", DTYPES)
        self._check_choice("head", HEADS)
        self._check_choice("param_dtype", DTYPES)
        for name in ("reversible", "causal", "tie_embeddings", "scan_layers", "sequential_rounds",
                     "sequential_heads"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "expected True or False")
        for name in ("dropout", "attention_dropout", "local_attention_dropout", "classifier_dropout"):
            rate = getattr(self, name)
            if name == "classifier_dropout" and rate is None:
                continue
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
                _fail(name, rate, "expected a rate in [0, 1)")
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)) \
                or not self.layer_norm_eps > 0:
            _fail("layer_norm_eps", self.layer_norm_eps, "expected a positive float such as 1e-6")
        self._check_buckets()
        self._check_direction()
        self._check_lengths()
        self._check_positions()
        if self.output_head == "concat":
            if not self.reversible:
                _fail("output_head", "concat", "'concat' joins the two reversible streams; use 'mean' when "
                      "reversible=False")
            if self.tie_embeddings:
                _fail("tie_embeddings", True, "the 'concat' head has width 2 * d_model and cannot be tied to "
                      "the embedding; set tie_embeddings=False or output_head='mean'")

    def _check_choice(self, name: str, choices: Tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            _fail(name, getattr(self, name), f"expected one of {', '.join(map(repr, choices))}")

    def _check_attn_layers(self) -> None:
        layers = self.attn_layers
        if layers is None:
            return
        if not isinstance(layers, tuple) or len(layers) != self.n_layers:
            _fail("attn_layers", layers, f"expected a tuple of n_layers={self.n_layers} attention types (or None "
                  f"for attention={self.attention!r} in every layer), e.g. {('local', 'lsh') * 2!r} with n_layers=4")
        unknown = [t for t in layers if t not in ATTENTION_TYPES]
        if unknown:
            _fail("attn_layers", layers, f"{unknown[0]!r} is not an attention type; expected each of "
                  f"{', '.join(map(repr, ATTENTION_TYPES))}")

    def _check_direction(self) -> None:
        if self.causal:
            for name in ("n_chunks_after", "local_n_chunks_after"):
                if getattr(self, name):
                    _fail(name, getattr(self, name), "a causal model never looks ahead: use 0, or causal=False for "
                          "a bidirectional encoder")
            if self.head != "lm":
                _fail("head", self.head, "the classification and question-answering heads read the whole "
                      "sequence: set causal=False")
        if self.head == "classification" and self.num_labels < 1:
            _fail("num_labels", self.num_labels, "expected a positive number of classes")

    def _check_buckets(self) -> None:
        nb = self.n_buckets
        if nb is None:
            return
        if isinstance(nb, tuple):
            if len(nb) != 2 or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 2 and f % 2 == 0
                                       for f in nb):
                _fail("n_buckets", nb, "a factorised bucket count is a tuple of two even integers >= 2, "
                      "e.g. (32, 16)")
        elif isinstance(nb, bool) or not isinstance(nb, int) or nb < 2 or nb % 2:
            _fail("n_buckets", nb, "expected an even integer >= 2 (angular LSH hashes into [xR, -xR]), "
                  "a tuple of two even integers, or None for the default")

    def _check_lengths(self) -> None:
        if self.uses("lsh") and self.max_len % self.chunk_len:
            _fail("max_len", self.max_len, f"LSH attention needs a multiple of chunk_len={self.chunk_len}, "
                  f"e.g. {self.chunk_len * max(1, self.max_len // self.chunk_len)}")
        for name, way in (("n_chunks_before", "look-back"), ("n_chunks_after", "look-ahead")):
            if self.uses("lsh") and self.sequential_rounds and getattr(self, name) > self.max_len // self.chunk_len:
                _fail(name, getattr(self, name), f"sequential_rounds needs at most max_len // chunk_len = "
                      f"{self.max_len // self.chunk_len} chunks of {way} (max_len={self.max_len}, "
                      f"chunk_len={self.chunk_len})")

    def _check_positions(self) -> None:
        if self.pos_embedding != "axial":
            return
        if self.axial_shape is None:
            object.__setattr__(self, "axial_shape", default_axial_shape(self.max_len))
        shape = self.axial_shape
        if (not isinstance(shape, tuple) or len(shape) != 2
                or not all(isinstance(s, int) and s >= 1 for s in shape) or math.prod(shape) != self.max_len):
            _fail("axial_shape", shape, f"expected two positive integers whose product is max_len={self.max_len}, "
                  f"e.g. {default_axial_shape(self.max_len)}")
        if self.axial_dims is None:
            object.__setattr__(self, "axial_dims", (self.d_model // 2, self.d_model - self.d_model // 2))
        dims = self.axial_dims
        if (not isinstance(dims, tuple) or len(dims) != 2 or not all(isinstance(s, int) and s >= 1 for s in dims)
                or sum(dims) != self.d_model):
            _fail("axial_dims", dims, f"expected two positive integers summing to d_model={self.d_model}")

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """One of the seed's four variants, with any field overridden.

        >>> ModelConfig.preset("reformer", n_hashes=4, n_layers=2).n_hashes
        4
        """
        variants = {
            # The seed's baselines store what ordinary autodiff stores: all heads at once.
            "transformer": dict(attention="full", reversible=False, ff_chunk_len=0, sequential_heads=False),
            "lsh": dict(attention="lsh", reversible=False, ff_chunk_len=0, sequential_heads=False),
            "reversible": dict(attention="full", reversible=True, ff_chunk_len=0, sequential_heads=False),
            "reformer": dict(attention="lsh", reversible=True, ff_chunk_len=256, output_chunk_len=256),
        }
        if name not in variants:
            raise ValueError(f"ModelConfig.preset: unknown preset {name!r}; expected one of "
                             f"{', '.join(map(repr, PRESETS))}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"ModelConfig.preset: unknown field(s) {', '.join(unknown)}; valid fields are "
                             f"{', '.join(sorted(fields))}.")
        return cls(**{**variants[name], **overrides})

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ----------------------------------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def layer_types(self) -> Tuple[str, ...]:
        """The attention type of each layer: `attn_layers`, or `attention` repeated n_layers times."""
        return self.attn_layers if self.attn_layers is not None else (self.attention,) * self.n_layers

    @property
    def grid_bits(self) -> int:
        """The exact-reversal grid a stack uses: stream_grid_bits when reversible, else 0 (off)."""
        return self.stream_grid_bits if self.reversible else 0

    def uses(self, attention_type: str) -> bool:
        """Whether any layer has this attention type ("full", "lsh" or "local")."""
        return attention_type in self.layer_types

    def resolved_n_buckets(self, seq_len: int) -> Union[int, Tuple[int, int]]:
        """Buckets per round at this sequence length (the config value, or trax's default)."""
        if self.n_buckets is not None:
            return self.n_buckets
        return default_n_buckets(seq_len, self.chunk_len)

    def padded_length(self, length: int) -> int:
        """The shortest length >= `length` the model runs on (a multiple of the LSH chunk, and at most or a multiple
        of the local chunk): what `ReformerLM.__call__` pads a sequence to. A ValueError if it exceeds max_len."""
        multiple = self.chunk_len if self.uses("lsh") else 1
        if self.uses("local") and length > self.local_chunk_len:
            multiple = math.lcm(multiple, self.local_chunk_len)
        padded = -(-max(length, 1) // multiple) * multiple
        if padded > self.max_len:
            raise ValueError(f"a sequence of {length} tokens (padded to {padded}, a multiple of the chunk lengths) is "
                             f"longer than the model's ModelConfig.max_len={self.max_len} positions; shorten it.")
        return padded

    def check_seq_len(self, seq_len: int) -> None:
        """Raise a ValueError naming the length if the model cannot run on sequences of this length."""
        if not isinstance(seq_len, int) or seq_len < 1:
            raise SettingError("", "seq_len", seq_len, "is invalid: expected a positive integer.")
        if seq_len > self.max_len:
            raise SettingError("", "seq_len", seq_len, f"is longer than ModelConfig.max_len={self.max_len}; raise "
                               "max_len or shorten the sequences.")
        if self.uses("lsh") and seq_len % self.chunk_len:
            raise SettingError("", "seq_len", seq_len, f"is not a multiple of ModelConfig.chunk_len={self.chunk_len}, "
                               "which LSH attention needs; e.g. "
                               f"seq_len={max(1, seq_len // self.chunk_len) * self.chunk_len}.")
        c = self.local_chunk_len
        if self.uses("local") and seq_len > c and seq_len % c:
            raise SettingError("", "seq_len", seq_len, f"is neither at most nor a multiple of "
                               f"ModelConfig.local_chunk_len={c}, which local attention needs; e.g. "
                               f"seq_len={max(1, seq_len // c) * c}.")
