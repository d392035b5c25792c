"""The training step's floating-point operations, counted from the model's own shapes, part by part.

    flops = train_step_flops(config, batch_size=1, seq_len=4096)
    flops.total, flops.forward, flops.parts["attention"].backward

What is counted: every matrix product of the model, 2 FLOPs per multiply-add (2 m k n for [m, k] x [k, n]), in
five parts (b batch, l length, d d_model, h heads, k d_head, f d_ff, V vocabulary):
- projections: each layer's input projections from d to h x k (shared-QK layers: qk and v; local layers: q, k
  and v) and the output projection back to d: 2 b l d h k each;
- feed_forward: each layer's two matmuls, 2 b l d f each;
- attention: the score product (queries against the keys they see) and the weighted sum of values, 2 b h l s k
  each, s the keys one query row sees: full attention all l; LSH attention (n_before + 1 + n_after) chunk_len per
  hash round, in every round; local attention (n_before + 1 + n_after) local_chunk_len, or l where the sequence
  is one chunk;
- hashing: LSH layers' random rotations, 2 b h l k r n (n = sum(f_i) / 2 columns per round of n_buckets' factors);
- output_head: the token logits, 2 b l w V (w = d, or 2 d for the "concat" head); a classification head's two
  products on the first position, 2 b (w d + d labels); a span head's start and end logits, 2 b l w 2.

A step is its forward pass, the backward pass, 2 x the forward of every differentiated product (one product for
each operand's gradient), and, in a reversible stack, one more forward of every layer's projections,
feed-forward and attention (the stack recovers each layer's inputs by recomputing its blocks). The hash is not
differentiated, and a reversible stack keeps the forward pass's bucket ids: hashing is forward only.

Not counted: elementwise work (norms, softmax, masks, the optimizer's update: O(b l d) or O(parameters), against
the matmuls' O(b l d f)), and recomputation the kernels choose for memory's sake (LSH's hand-written backward
forming a round's scores again, one-head-at-a-time hashing projecting qk again, the chunked loss forming its
logits again, checkpointed feed-forward chunks). The count is the model's own work, the same for any
implementation of it, so FLOP/s from it compare implementations fairly and understate this one's hardware rate.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from reformer_jax.model.config import ModelConfig

PARTS = ("projections", "feed_forward", "attention", "hashing", "output_head")
LAYER_PARTS = ("projections", "feed_forward", "attention")  # what a reversible stack recomputes
DIFFERENTIATED = ("projections", "feed_forward", "attention", "output_head")


@dataclasses.dataclass(frozen=True)
class PartFlops:
    """One part's FLOPs in the forward pass, the backward pass and the reversible stack's recomputation."""

    forward: int
    backward: int
    recompute: int

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.recompute


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """A training step's FLOPs: `parts` maps each of PARTS to its PartFlops."""

    parts: Dict[str, PartFlops]

    def _sum(self, field: str) -> int:
        return sum(getattr(p, field) for p in self.parts.values())

    @property
    def forward(self) -> int:
        return self._sum("forward")

    @property
    def backward(self) -> int:
        return self._sum("backward")

    @property
    def recompute(self) -> int:
        return self._sum("recompute")

    @property
    def total(self) -> int:
        return self._sum("total")

    def to_dict(self) -> Dict[str, object]:
        """{"forward", "backward", "recompute", "total", "parts": {part: {forward, backward, recompute, total}}}."""
        return {"forward": self.forward, "backward": self.backward, "recompute": self.recompute, "total": self.total,
                "parts": {name: {**dataclasses.asdict(p), "total": p.total} for name, p in self.parts.items()}}


def keys_seen(kind: str, length: int, *, chunk_len: int, n_chunks_before: int, n_chunks_after: int = 0) -> int:
    """Keys s one query row attends to in a layer of this attention type ("full", "lsh", "local"), per hash round.

    LSH attention chunks the sorted order of every round (its chunks wrap around, so a sequence of one chunk still
    sees n_before + 1 + n_after copies); local attention treats a sequence no longer than a chunk as one chunk with
    no look-back or look-ahead (`reformer_jax.kernels.local`).

    >>> keys_seen("lsh", 4096, chunk_len=64, n_chunks_before=1), keys_seen("local", 32, chunk_len=64, n_chunks_before=1)
    (128, 32)
    """
    if kind == "full":
        return length
    if kind == "local" and length <= chunk_len:
        return length
    if kind not in ("lsh", "local"):
        raise ValueError(f"keys_seen: kind={kind!r} is invalid: expected 'full', 'lsh' or 'local'.")
    return (n_chunks_before + 1 + n_chunks_after) * chunk_len


def attention_product_flops(kind: str, *, batch: int, heads: int, length: int, d_head: int, chunk_len: int = 1,
                            n_chunks_before: int = 0, n_chunks_after: int = 0, n_hashes: int = 1) -> int:
    """FLOPs of one layer's attention products in the forward pass: scores [l, k] x [k, s] and weighted sum
    [l, s] x [s, k] for every batch row, head and (LSH) hash round: 4 b h r l s k."""
    rounds = n_hashes if kind == "lsh" else 1
    s = keys_seen(kind, length, chunk_len=chunk_len, n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after)
    return 2 * 2 * batch * heads * rounds * length * s * d_head


def hash_columns(n_buckets) -> int:
    """Columns of one round's hash projection: sum(f_i) / 2 over n_buckets' factors (an int is one factor)."""
    return sum(f // 2 for f in (n_buckets if isinstance(n_buckets, tuple) else (n_buckets,)))


def layer_forward_flops(config: ModelConfig, kind: str, batch: int, seq_len: int) -> Dict[str, int]:
    """{part: forward FLOPs} of one layer whose attention is `kind`, for PARTS but the output head."""
    b, l, d, h, k = batch, seq_len, config.d_model, config.n_heads, config.d_head
    projections = (4 if kind == "local" else 3) * 2 * b * l * d * h * k  # q, k, v (or qk, v) and out
    if kind == "local":
        window = dict(chunk_len=config.local_chunk_len, n_chunks_before=config.local_n_chunks_before,
                      n_chunks_after=config.local_n_chunks_after)
    else:
        window = dict(chunk_len=config.chunk_len, n_chunks_before=config.n_chunks_before,
                      n_chunks_after=config.n_chunks_after)
    attention = attention_product_flops(kind, batch=b, heads=h, length=l, d_head=k, n_hashes=config.n_hashes,
                                        **window)
    hashing = 2 * b * h * l * k * config.n_hashes * hash_columns(config.resolved_n_buckets(l)) if kind == "lsh" else 0
    return {"projections": projections, "feed_forward": 2 * 2 * b * l * d * config.d_ff, "attention": attention,
            "hashing": hashing}


def forward_flops(config: ModelConfig, batch: int, seq_len: int) -> Dict[str, int]:
    """{part: FLOPs} of the model's forward pass (the loss's logits included) on [batch, seq_len] tokens."""
    config.check_seq_len(seq_len)
    totals = dict.fromkeys(PARTS, 0)
    for kind in config.layer_types:
        for part, value in layer_forward_flops(config, kind, batch, seq_len).items():
            totals[part] += value
    width = 2 * config.d_model if config.output_head == "concat" else config.d_model
    if config.head == "classification":  # dense [w, d] and out_proj [d, labels] on the first position
        totals["output_head"] = 2 * batch * (width * config.d_model + config.d_model * config.num_labels)
    elif config.head == "question_answering":  # start and end logits at every position
        totals["output_head"] = 2 * batch * seq_len * width * 2
    else:  # a token's logits at every position
        totals["output_head"] = 2 * batch * seq_len * width * config.vocab_size
    return totals


def train_step_flops(config: ModelConfig, batch_size: int, seq_len: int) -> StepFlops:
    """The training step's FLOPs by part (see the module docstring): forward, backward (2 x the forward of the
    differentiated parts) and the reversible stack's recomputation (one forward of LAYER_PARTS)."""
    forward = forward_flops(config, batch_size, seq_len)
    return StepFlops({part: PartFlops(forward=value, backward=2 * value if part in DIFFERENTIATED else 0,
                                      recompute=value if config.reversible and part in LAYER_PARTS else 0)
                      for part, value in forward.items()})


def dense_matmul_shapes(config: ModelConfig, batch: int, seq_len: int) -> List[Tuple[int, int, int]]:
    """The step's dense matmuls over all positions as (m, k, n) for [m, k] x [k, n]: a projection, the
    feed-forward's two and the output head's (where a rate is probed at the step's own shapes)."""
    rows = batch * seq_len
    width = 2 * config.d_model if config.output_head == "concat" else config.d_model
    hk = config.n_heads * config.d_head
    shapes = [(rows, config.d_model, hk), (rows, config.d_model, config.d_ff), (rows, config.d_ff, config.d_model)]
    return shapes + ([(rows, width, config.vocab_size)] if config.head == "lm" else [])


def achieved(step: StepFlops, step_s: Optional[float], matmul_flops_per_s: Optional[float]) -> Dict[str, object]:
    """A timed step against the roofline: {"step_gflop", "gflops_per_s", "matmul_gflops_per_s",
    "roofline_fraction", "flops": step.to_dict()}; the rates are None without a time, the fraction without a
    measured dense matmul rate (FLOP/s, `reformer_jax.xla.matmul_rate`)."""
    rate = step.total / step_s if step_s else None
    return {"step_gflop": step.total / 1e9, "gflops_per_s": rate / 1e9 if rate else None,
            "matmul_gflops_per_s": matmul_flops_per_s / 1e9 if matmul_flops_per_s else None,
            "roofline_fraction": rate / matmul_flops_per_s if rate and matmul_flops_per_s else None,
            "flops": step.to_dict()}
