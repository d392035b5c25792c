"""The PyTorch Reformers timed beside ours: Hugging Face transformers and lucidrains' reformer-pytorch.

Each builder returns a `TorchStep` training a model of the given sizes with Adafactor (transformers' own, no
relative step or parameter scaling, as optax.adafactor(multiply_by_parameter_scale=False)) after clipping
gradients to global norm 1, as reformer_jax.training.step does. Neither library is a dependency of reformer_jax:
`pip install -r benchmarks/requirements-peers.txt`.

Sizes are a dict: vocab_size, d_model, n_heads, d_head, d_ff, n_layers, seq_len, batch_size, n_hashes, chunk_len,
n_buckets, ff_chunk_len.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Dict, Optional

PEERS = ("hf", "reformer_pytorch")
PEER_LABELS = {"hf": "Hugging Face ReformerModelWithLMHead", "reformer_pytorch": "lucidrains reformer_pytorch.ReformerLM"}
# The distribution each peer needs, for the "not installed" message.
PEER_PACKAGES = {"hf": ("torch", "transformers"), "reformer_pytorch": ("torch", "reformer_pytorch")}


def missing_packages(peer: str) -> list:
    """The Python packages this peer needs that are not importable here (empty when it can run)."""
    return [name for name in PEER_PACKAGES[peer] if importlib.util.find_spec(name) is None]


def peer_versions(peer: str) -> Dict[str, str]:
    from importlib import metadata

    names = {"torch": "torch", "transformers": "transformers", "reformer_pytorch": "reformer-pytorch"}
    return {f"{name}_version": metadata.version(names[name]) for name in PEER_PACKAGES[peer]}


class TorchStep:
    """One training step of a torch language model: forward with loss, backward, clip, Adafactor update."""

    def __init__(self, model, loss_of: Callable[[Any, Any], Any], tokens):
        import torch
        from transformers.optimization import Adafactor

        self.model = model.train()
        self.loss_of = loss_of
        self.tokens = tokens
        self.optimizer = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False,
                                   warmup_init=False)
        self._torch = torch

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_of(self.model, self.tokens)
        loss.backward()
        self._torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return float(loss.detach())

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _hf_buckets(n_buckets):
    return list(n_buckets) if isinstance(n_buckets, (tuple, list)) else n_buckets


def build_hf(sizes: Dict[str, Any], tokens) -> TorchStep:
    """`ReformerModelWithLMHead` with LSH layers only, decoder (causal), dropout 0, absolute positions, its own
    reversible training path; loss from `labels` (shifted inside the model). tokens: int64 [b, l]."""
    from transformers import ReformerConfig, ReformerModelWithLMHead

    config = ReformerConfig(
        vocab_size=sizes["vocab_size"], hidden_size=sizes["d_model"], num_attention_heads=sizes["n_heads"],
        attention_head_size=sizes["d_head"], feed_forward_size=sizes["d_ff"], attn_layers=["lsh"] * sizes["n_layers"],
        is_decoder=True, max_position_embeddings=sizes["seq_len"], axial_pos_embds=False,
        num_hashes=sizes["n_hashes"], lsh_attn_chunk_length=sizes["chunk_len"], num_buckets=_hf_buckets(sizes["n_buckets"]),
        lsh_num_chunks_before=1, lsh_num_chunks_after=0, hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0, hidden_act="relu", layer_norm_eps=1e-6,
        chunk_size_feed_forward=sizes["ff_chunk_len"], use_cache=False, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1)
    model = ReformerModelWithLMHead(config)
    return TorchStep(model, lambda m, t: m(input_ids=t, labels=t).loss, tokens)


def build_reformer_pytorch(sizes: Dict[str, Any], tokens) -> TorchStep:
    """lucidrains' `ReformerLM`: causal, reversible at every length, dropout 0, absolute positions, ReLU
    feed-forward in length / ff_chunk_len chunks; its bucket_size is the chunk length (it then uses
    length / chunk_len buckets per round, where Hugging Face and reformer_jax use twice as many)."""
    import torch
    from reformer_pytorch import ReformerLM

    if sizes["d_ff"] % sizes["d_model"]:
        raise ValueError(f"reformer_pytorch needs d_ff a multiple of d_model (ff_mult); got d_ff={sizes['d_ff']}, "
                         f"d_model={sizes['d_model']}.")
    length = sizes["seq_len"]
    ff_chunks = max(1, length // sizes["ff_chunk_len"]) if sizes["ff_chunk_len"] else 1
    model = ReformerLM(
        num_tokens=sizes["vocab_size"], dim=sizes["d_model"], depth=sizes["n_layers"], max_seq_len=length,
        heads=sizes["n_heads"], dim_head=sizes["d_head"], bucket_size=sizes["chunk_len"], n_hashes=sizes["n_hashes"],
        ff_chunks=ff_chunks, attn_chunks=1, causal=True, lsh_dropout=0.0, ff_dropout=0.0, post_attn_dropout=0.0,
        layer_dropout=0.0, ff_mult=sizes["d_ff"] // sizes["d_model"], ff_activation=torch.nn.ReLU,
        absolute_position_emb=True, reverse_thres=0)

    def loss_of(m, t):
        logits = m(t[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))

    # It predicts tokens 1..l from 0..l-1, so it is fed one token more to train on the same l positions.
    return TorchStep(model, loss_of, tokens)


BUILDERS: Dict[str, Callable[[Dict[str, Any], Any], TorchStep]] = {"hf": build_hf,
                                                                    "reformer_pytorch": build_reformer_pytorch}


def build(peer: str, sizes: Dict[str, Any], tokens_np, *, threads: Optional[int] = None) -> TorchStep:
    """The peer's training step on these tokens (numpy int [b, l + 1]; HF uses the first l)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokens = torch.from_numpy(tokens_np).long()
    if peer == "hf":
        tokens = tokens[:, :-1].contiguous()
    return BUILDERS[peer](sizes, tokens)
