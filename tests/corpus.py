"""The text the training tests read: the shared tiny Shakespeare copy when present, else one the tests write."""

from pathlib import Path

SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def corpus_path(tmp_dir: Path) -> Path:
    if SHARED_CORPUS.is_file():
        return SHARED_CORPUS
    # A fresh clone without ../shared: a small, learnable, English-like text.
    lines = [f"{who}: {what} the {thing} of {place}, and {what} it well.\n"
             for who in ("ROMEO", "JULIET", "HAMLET", "KING", "QUEEN")
             for what in ("I see", "thou hast", "we know", "they keep")
             for thing in ("crown", "night", "sword", "heart", "grave")
             for place in ("Verona", "Denmark", "England", "Rome")]
    path = Path(tmp_dir) / "small_corpus.txt"
    path.write_text("".join(lines) * 3)
    return path
