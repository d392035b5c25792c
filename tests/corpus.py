"""The text the training tests read: tiny Shakespeare as the package ships it, written to a file they can pass."""

from pathlib import Path

from reformer_jax.training import data


def corpus_path(tmp_dir: Path) -> Path:
    """tiny Shakespeare (the packaged copy, sha256-checked) as a plain file under `tmp_dir`."""
    path = Path(tmp_dir) / data.TINY_SHAKESPEARE_FILE
    if not path.exists():
        path.write_bytes(data.packaged_tiny_shakespeare())
    return path
