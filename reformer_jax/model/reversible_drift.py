"""How far the reversible stack's recomputed inputs drift from the true ones, at initialisation.

    rows = measure_drift(config, depths=(2, 8, 48), batch_size=1, seq_len=1024)   # config.n_layers >= 48

The backward pass of the reversible stack never stores a layer's inputs: it recomputes them from the outputs,
x2 = y2 - G(y1), x1 = y1 - F(x2), last layer first, with the forward pass's bucket ids. On plain float32 streams
each forward sum y = x + F rounds away x's low bits, so the subtraction cannot give them back, and the error grows
with depth; on the exact-reversal grid (ModelConfig.stream_grid_bits, `reformer_jax.kernels.reversible`) the sums
are exact while |stream| stays below 2^(24 - k). `measure_drift` runs the stack's own forward and backward passes
(`recovered_inputs`, random cotangents) over the first n layers of one model, dropout off, on the embedded tokens;
`output_change` is what the grid changes in the model's logits and loss. `python -m benchmarks.reversible_drift`
tabulates both.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reformer_jax.kernels.reversible import recovered_inputs, to_grid
from reformer_jax.model.config import ModelConfig
from reformer_jax.model.reformer_lm import ReformerLM, block_functions, init_params


def stack_inputs(config: ModelConfig, params: Any, tokens: jax.Array) -> jax.Array:
    """The embedded tokens the model feeds its layer stack: token embedding + positions, on the stack's grid.
    [b, l] -> [b, l, d]."""
    positions = ReformerLM(config).apply({"params": params}, tokens.shape[1],
                                         method=lambda model, length: model.positions(length))
    x = jnp.take(params["embed"], tokens, axis=0).astype(jnp.float32) + positions.astype(jnp.float32)
    return to_grid(x, config.grid_bits)


@functools.partial(jax.jit, static_argnums=(0, 1))
def recovered_through(config: ModelConfig, depth: int, layer_params, keys, x, cotangents):
    """Through the first `depth` layers: the inputs (x1, x2) as the stack's backward pass recovers them
    [2, b, l, d], and the largest |y1|, |y2| of their output (how close the streams come to the grid's range)."""
    attention_fn, feed_forward_fn, reverse_fn = block_functions(config, config.layer_types[0], deterministic=True)
    first_params, first_keys = jax.tree.map(lambda leaf: leaf[:depth], (layer_params, keys))
    recovered, outputs = recovered_inputs(attention_fn, feed_forward_fn, first_params, x, x, first_keys,
                                          *cotangents, ff_chunk_len=config.ff_chunk_len,
                                          attention_reverse_fn=reverse_fn, grid_bits=config.grid_bits)
    return jnp.stack(recovered), jnp.max(jnp.abs(jnp.stack(outputs)))


def _relative_error(recovered: np.ndarray, true: np.ndarray) -> float:
    """max over the two streams of ||recovered - true||_F / ||true||_F, in float64."""
    recovered, true = np.asarray(recovered, np.float64), np.asarray(true, np.float64)
    return max(float(np.linalg.norm(r - t) / np.linalg.norm(t)) for r, t in zip(recovered, true))


def _example(config: ModelConfig, batch_size: int, seq_len: int, seed: int):
    """(parameters, tokens [b, l], per-layer keys [n, 2]) of the measurement, the same for every setting."""
    params = init_params(config, jax.random.key(seed))
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch_size, seq_len), 3, config.vocab_size)
    return params, tokens, jax.random.split(jax.random.key(seed + 2), (config.n_layers, 2))


def measure_drift(config: ModelConfig, depths: Sequence[int], *, batch_size: int, seq_len: int,
                  seed: int = 0) -> List[Dict[str, Any]]:
    """One row per depth n: relative error of the stack inputs recovered through the first n layers.

    `config.n_layers` must be at least max(depths); shallower depths use the model's first layers. The grid is
    `config.stream_grid_bits` (0: plain float32 streams).
    """
    if max(depths) > config.n_layers or min(depths) < 1:
        raise ValueError(f"depths {tuple(depths)} must lie in [1, n_layers={config.n_layers}].")
    params, tokens, keys = _example(config, batch_size, seq_len, seed)
    x = stack_inputs(config, params, tokens)
    cotangents = jax.random.normal(jax.random.key(seed + 3), (2,) + x.shape)
    true_inputs = np.stack([np.asarray(x)] * 2)
    rows = []
    for depth in depths:
        recovered, max_stream = recovered_through(config, depth, params["layers"], keys, x, cotangents)
        recovered = np.asarray(recovered, np.float64)
        rows.append({"dtype": config.dtype, "grid_bits": config.grid_bits, "n_layers": int(depth),
                     "relative_error": _relative_error(recovered, true_inputs),
                     "max_abs_error": float(np.max(np.abs(recovered - true_inputs))),
                     "input_rms": float(np.sqrt(np.mean(true_inputs.astype(np.float64) ** 2))),
                     "max_abs_stream": float(max_stream)})
    return rows


def output_change(config: ModelConfig, grid_bits: int, *, batch_size: int, seq_len: int,
                  seed: int = 0) -> Dict[str, Any]:
    """What the grid changes in the whole model's output at initialisation: the relative Frobenius change of the
    logits and the next-token loss (nats), grid on (`grid_bits`) against grid off, same parameters and tokens."""
    params, tokens, _ = _example(config, batch_size, seq_len, seed)
    rngs = {"lsh": jax.random.key(seed + 4)}

    def logits_and_loss(bits):
        logits = ReformerLM(config.replace(stream_grid_bits=bits)).apply({"params": params}, tokens, rngs=rngs)
        log_probs = jax.nn.log_softmax(logits[:, :-1])
        loss = -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))
        return np.asarray(logits, np.float64), float(loss)

    (plain, loss_plain), (grid, loss_grid) = logits_and_loss(0), logits_and_loss(grid_bits)
    return {"dtype": config.dtype, "grid_bits": grid_bits, "n_layers": config.n_layers,
            "logits_relative_change": float(np.linalg.norm(grid - plain) / np.linalg.norm(plain)),
            "logits_max_abs_change": float(np.max(np.abs(grid - plain))), "loss_grid_off": loss_plain,
            "loss_grid_on": loss_grid}
