"""Convert a Hugging Face Reformer checkpoint for reformer_jax, from the command line or from Python.

    python -m reformer_jax.convert --hf_dir=DIR --out=OUT    # DIR: config.json + model.safetensors or
                                                             #      pytorch_model.bin, downloaded by the user
    python main.py --init_from=OUT ...                       # train or fine-tune from the converted weights

The conversion itself lives in `reformer_jax.model.hf_convert`; its public functions are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from reformer_jax.model.hf_convert import (ConversionError, config_from_fields, config_from_hf, from_hf,
                                           load_converted_config, load_converted_params, load_converted_tokenizer,
                                           load_hf_dir, save_converted, tokenizer_for_hf)

__all__ = ["ConversionError", "config_from_fields", "config_from_hf", "from_hf", "load_converted_config",
           "load_converted_params", "load_converted_tokenizer", "load_hf_dir", "save_converted", "tokenizer_for_hf"]


def main(argv) -> int:
    from absl import flags, logging

    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # orbax logs every write at INFO level
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.hf_dir or not FLAGS.out:
        raise SystemExit("usage: python -m reformer_jax.convert --hf_dir=DIR --out=DIR")
    try:
        state_dict, hf_config = load_hf_dir(Path(FLAGS.hf_dir))
        config, params = from_hf(state_dict, hf_config)
        tokenizer = tokenizer_for_hf(hf_config, Path(FLAGS.hf_dir))
        save_converted(config, params, Path(FLAGS.out), tokenizer=tokenizer)
    except ConversionError as error:
        print(f"error: {error}")
        return 1
    print(f"converted {FLAGS.hf_dir} -> {FLAGS.out}: {config.n_layers} layers {list(config.layer_types)}, "
          f"d_model {config.d_model}, vocab {config.vocab_size}, max_len {config.max_len}, tokenizer "
          f"{tokenizer.name if tokenizer else 'none (ids only)'}")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("hf_dir", None, "Hugging Face Reformer directory (config.json + weights).")
    flags.DEFINE_string("out", None, "Directory to create with config.json and the orbax params.")
    app.run(main)
