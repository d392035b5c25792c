"""REPORT.md's TPU sections: the training step compiled for TPU chips on this machine (benchmarks.memory
--experiment=tpu: benchmarks/tpu_memory.py), one section per results file that exists."""

from __future__ import annotations

from typing import List

from benchmarks import tpu_memory
from benchmarks.reporting.common import load

PARTS = (
    ("tpu", "On one TPU chip: the variants at the seed's setup",
     "The TPU compiler (libtpu, through `jax.experimental.topologies`) compiled each variant's training step for one "
     "chip of each generation, in float32 and bfloat16 compute, beside XLA:CPU's peak of the same step on this "
     "machine and the seed's GPU figure.", tpu_memory.seed_markdown, "tpu.png"),
    ("tpu_longest", "On TPU chips: the longest sequence per chip",
     "For each variant and slice: the longest power-of-two sequence whose training step fits, then the longest "
     "multiple of the step (`benchmarks/longest_fit.py`: each probe a TPU compile; the answer is a probed pair, "
     "the longest length that fit and the next step up that did not). The step is the chunk length (64) for full "
     "attention and 32 chunks (2048) for the LSH variants: their default bucket count (2 x length / chunk, split "
     "into two factors near its square root, as trax does) has no such split at many multiples of the chunk, and "
     "there the hash alone needs more memory than the rest of the step (`search_step` in "
     "`benchmarks/tpu_memory.py`). One chip, then 16 chips with fsdp "
     "over all of them and one sequence per chip.", tpu_memory.longest_markdown, "tpu_longest.png"),
    ("tpu_long", "On a TPU slice: a very long sequence with fsdp",
     "The Reformer's training step with one very long sequence per chip, fsdp over the slice.",
     tpu_memory.long_markdown, None),
)


def sections(results: str, rel: str) -> List[str]:
    out: List[str] = []
    for name, title, what, table, png in PARTS:
        rows = load(results, name)
        if not rows:
            continue
        out.append(f"\n## {title}\n")
        out.append(f"{what} Results: [`{name}.json`]({rel}/{name}.json)"
                   + (f", plot [`{png}`]({rel}/{png})" if png else "") + f". {tpu_memory.intro(rows)}\n")
        out.append(table(rows))
    return out
