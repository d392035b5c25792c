"""REPORT.md's generation section (benchmarks.generate): cached decoding against the window re-reading sampler
and Hugging Face's cached generate, and the bpc of a trained run scored by cached decoding."""

from __future__ import annotations

import os
from typing import List

from benchmarks.reporting.common import load


def sections(results: str, rel: str) -> List[str]:
    """Generation (benchmarks.generate): the speed table and the scoring check, as the driver wrote them."""
    out: List[str] = []
    for name, title in (("generate", "Generation speed"), ("generate_bpc", "Scoring by cached decoding")):
        path = os.path.join(results, f"{name}.md")
        rows = load(results, name)
        if not rows or not os.path.exists(path):
            continue
        with open(path) as f:
            body = f.read().split("\n", 1)[1].lstrip("\n")  # the driver's own title gives way to this one
        out.append(f"\n## {title}\n")
        out.append(f"`{rows[0].get('command', 'python -m benchmarks.generate')}` -> [`{name}.json`]({rel}/{name}.json)\n")
        out.append(body)
        out.extend(f"- {line}" for line in GENERATION_NOTES[name])
    return out


GENERATION_NOTES = {
    "generate": [
        "Our per-token times moved between 16 and 26 ms from one prompt length to the next in this run: the step "
        "does the same work at every length (its caches are written in place and an LSH step reads 2 x 128 "
        "positions per layer, a local step its 128-position window), and the 2 CPUs were shared, so the "
        "64k / 4k ratio below 1 is load, not speed-up; read it as flat.",
        "Hugging Face's cached step took about 1 s per token at every length here; we did not profile where its "
        "time goes, so the ratio to it is as measured on this loaded machine and may be smaller elsewhere.",
        "The Transformer's cached step reads its whole max_len key/value cache at every step (positions after "
        "the newest are masked), so it costs the same at every prompt length (here max_len 66560); its prefill "
        "holds a [heads, l, l] score matrix, which is why it runs only up to 4k.",
    ],
    "generate_bpc": [
        "The run: `python main.py --model=reformer --d_model=128 --n_heads=4 --d_ff=256 --n_layers=3 --seq_len=512 "
        "--batch_size=8 --steps=600 --chunk_len=32 --n_hashes=4 --dataset=text "
        "--data_path=../shared/data/tinyshakespeare.txt --time_limit_minutes=12` (stopped by its time limit at "
        "step 288), scored on 8 validation sequences of 512 tokens; the forward pass hashes each sequence with "
        "its own rotations, cached decoding with one set per batch.",
    ],
}
