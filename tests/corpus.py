"""What the training tests read: tiny Shakespeare as the package ships it, written to a file they can pass, and a
dataset that stands for a run killed at a given step."""

from pathlib import Path

from reformer_jax.training import data


def corpus_path(tmp_dir: Path) -> Path:
    """tiny Shakespeare (the packaged copy, sha256-checked) as a plain file under `tmp_dir`."""
    path = Path(tmp_dir) / data.TINY_SHAKESPEARE_FILE
    if not path.exists():
        path.write_bytes(data.packaged_tiny_shakespeare())
    return path


class CrashAt:
    """A dataset that fails when asked for a given training step: a run killed after its last checkpoint."""

    def __init__(self, inner, step):
        self.inner, self.step, self.source = inner, step, inner.source
        self.origin = getattr(inner, "origin", None)

    def batch(self, split, seed, step, batch_size, seq_len):
        if split == "train" and step == self.step:
            raise KeyboardInterrupt("simulated kill")
        return self.inner.batch(split, seed, step, batch_size, seq_len)
