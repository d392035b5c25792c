"""reformer_jax main job: build a variant and print where its training step's memory goes.

    python main.py --model=reformer --n_hashes=4
"""

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "reformer", ["transformer", "lsh", "reversible", "reformer"], "Model variant (preset).")
flags.DEFINE_integer("n_hashes", 8, "LSH hash rounds.")
flags.DEFINE_integer("n_layers", 6, "Number of layers.")
flags.DEFINE_integer("seq_len", 4096, "Sequence length.")
flags.DEFINE_integer("batch_size", 1, "Batch size.")


def main(argv):
    del argv
    from reformer_jax import ModelConfig
    from reformer_jax.memory import analyze_train_step

    config = ModelConfig.preset(FLAGS.model, n_hashes=FLAGS.n_hashes, n_layers=FLAGS.n_layers, max_len=FLAGS.seq_len)
    stats = analyze_train_step(config, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len)
    print(stats.summary())


if __name__ == "__main__":
    app.run(main)
