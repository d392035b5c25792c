"""Generate text from a trained or converted model, streaming it as it is decoded.

    python -m reformer_jax.generate --workdir=runs/default --prompt="ROMEO:" --max_new_tokens=500
    python -m reformer_jax.generate --init_from=converted/ --prompt="The " --greedy

--workdir: a main.py run (its run_settings.json and latest checkpoint); --init_from: a converted Hugging Face
checkpoint (python -m reformer_jax.convert). Text is byte-level (one token per UTF-8 byte). Errors are one line.
"""

from __future__ import annotations

import codecs
import sys
import time
from pathlib import Path

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A main.py run directory: the model of its run_settings.json, the parameters "
                    "of its latest checkpoint.")
flags.DEFINE_string("init_from", None, "A converted checkpoint directory (python -m reformer_jax.convert --out=DIR) "
                    "instead of --workdir.")
flags.DEFINE_string("prompt", None, "Text to continue (at least one character).")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens (bytes) to generate.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature, > 0 (use --greedy for the most likely token).")
flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
flags.DEFINE_float("top_p", None, "Sample among the most likely tokens whose probabilities add up to this, in (0, 1].")
flags.DEFINE_bool("greedy", False, "Always pick the most likely token.")
flags.DEFINE_integer("seed", 0, "Seed of the sampling draws and the LSH hash rotations.")
flags.DEFINE_integer("stream_every", 16, "Tokens decoded on the device between two prints.")


class LoadError(ValueError):
    """A --workdir or --init_from that holds no usable model."""


def load_run(workdir: Path):
    """(ModelConfig, params) of a main.py run's latest checkpoint."""
    import jax
    import jax.numpy as jnp

    from reformer_jax.training import step as train
    from reformer_jax.training.checkpoint import Checkpointer, saved_run_settings
    from reformer_jax.model.hf_convert import config_from_fields

    settings = saved_run_settings(workdir)
    if settings is None or "model" not in settings:
        raise LoadError(f"--workdir={workdir} holds no run_settings.json of a main.py run; pass the --workdir of a "
                        "run, or --init_from=DIR for a converted checkpoint.")
    if not (Path(workdir) / "checkpoints").is_dir():
        raise LoadError(f"--workdir={workdir} holds no checkpoint (no {Path(workdir) / 'checkpoints'}); train it "
                        "first (python main.py --workdir=...) or pass a run that saved one.")
    try:
        config = config_from_fields(settings["model"])
    except (TypeError, ValueError) as error:
        raise LoadError(f"--workdir={workdir}: run_settings.json holds no valid model ({error}).") from error
    checkpointer = Checkpointer(workdir)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise LoadError(f"--workdir={workdir} holds no complete checkpoint in {checkpointer.directory}; train "
                            "it first or pass a run that saved one.")
        tx = train.make_optimizer(settings["optimizer"], settings["learning_rate"],
                                  schedule_steps=settings["schedule_steps"], warmup_steps=settings["warmup_steps"],
                                  clip_norm=settings["clip_norm"])
        abstract = jax.eval_shape(lambda key: train.create_train_state(key, config, tx).replace(
            step=jnp.zeros((), jnp.int32)), jax.random.key(0))
        state = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    return config, state.params, f"{workdir} (step {step})"


def load_converted(directory: Path):
    """(ModelConfig, params) of a converted checkpoint."""
    import jax

    from reformer_jax.model.hf_convert import load_converted_config, load_converted_params
    from reformer_jax.model.reformer_lm import init_params

    config = load_converted_config(directory)
    target = jax.eval_shape(init_params, config, jax.random.key(0))
    return config, load_converted_params(directory, target), str(directory)


def _stream_bytes():
    """A writer of token blocks to stdout: bytes decoded as UTF-8 incrementally (a character split over two blocks
    prints whole); special ids (pad, eos, bos) print nothing."""
    import numpy as np

    from reformer_jax.training import data

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(tokens):
        ids = np.asarray(tokens).reshape(-1)
        ids = ids[(ids >= data.BYTE_OFFSET) & (ids < data.BYTE_VOCAB_SIZE)] - data.BYTE_OFFSET
        sys.stdout.write(decoder.decode(ids.astype(np.uint8).tobytes()))
        sys.stdout.flush()

    return write


def run() -> int:
    from reformer_jax.training import data
    from reformer_jax.training.checkpoint import CheckpointError
    from reformer_jax.model.hf_convert import ConversionError
    from reformer_jax.decoding import generation

    if (FLAGS.workdir is None) == (FLAGS.init_from is None):
        raise LoadError("pass exactly one of --workdir=DIR (a main.py run) and --init_from=DIR (a converted "
                        "checkpoint).")
    if not FLAGS.prompt:
        raise generation.GenerateError(f"--prompt={FLAGS.prompt!r} is empty: give at least one character to "
                                       "continue, e.g. --prompt='ROMEO:'.")
    try:
        config, params, source = (load_run(Path(FLAGS.workdir)) if FLAGS.workdir else
                                  load_converted(Path(FLAGS.init_from)))
    except (ConversionError, CheckpointError) as error:
        raise LoadError(str(error)) from error
    prompt = data.encode(FLAGS.prompt)
    rows = generation.check_arguments(config, [prompt], FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k,
                                      FLAGS.top_p, FLAGS.greedy)
    import jax

    how = "greedy" if FLAGS.greedy else (f"temperature {FLAGS.temperature:g}" + (f", top-k {FLAGS.top_k}" if FLAGS.top_k
                                         else "") + (f", top-p {FLAGS.top_p:g}" if FLAGS.top_p else ""))
    print(f"model: {source}; {len(prompt)} prompt tokens, {FLAGS.max_new_tokens} new ({how})", file=sys.stderr)
    print("=== prompt ===")
    print(FLAGS.prompt)
    print("=== generated ===", flush=True)
    started = time.perf_counter()
    generation.generate(config, params, rows, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                        top_k=FLAGS.top_k, top_p=FLAGS.top_p, greedy=FLAGS.greedy, rng=jax.random.key(FLAGS.seed),
                        on_tokens=_stream_bytes(), stream_every=max(1, FLAGS.stream_every))
    seconds = time.perf_counter() - started
    print()
    print(f"=== {FLAGS.max_new_tokens} tokens in {seconds:.1f} s, compilation included "
          f"({FLAGS.max_new_tokens / seconds:.1f} tokens/s) ===", file=sys.stderr)
    return 0


def main(argv) -> int:
    from reformer_jax.decoding.generation import GenerateError

    logging.set_verbosity(logging.ERROR)  # orbax logs reads at INFO and WARNING level
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}")
        return 2
    try:
        return run()
    except (LoadError, GenerateError) as error:
        print(f"error: {error}")
        return 1


if __name__ == "__main__":
    app.run(main)
