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
    return out
