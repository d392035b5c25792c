"""XLA compiler options of the steps a run executes (training, evaluation, initialisation).

    jax.jit(step, compiler_options=step_compiler_options(lean=True))   # main.py --lean_compile

On CPU, XLA's MLIR fusion emitters (`xla_cpu_use_fusion_emitters`, on by default in jaxlib 0.10) hold a few hundred
MB while they compile a Reformer step, several times the step's own buffers at the speed benchmark's size, and the
process's peak RSS keeps that high-water mark. "Lean" compilation turns them off: XLA's classic emitters compile
the same computation with far less memory, but the compiled step runs slower. It is therefore opt-in
(`main.py --lean_compile`, `benchmarks.speed --ours=...,lean_compile` measures both); other backends get no
options either way. The memory benchmark compiles with its own options (`reformer_jax.memory.compiler_options`),
so its compile-time figures do not depend on this module.
"""

from __future__ import annotations

from typing import Dict, Optional

import jax

LEAN_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def step_compiler_options(backend: Optional[str] = None, lean: bool = False) -> Dict[str, bool]:
    """Options for jax.jit(..., compiler_options=) / Lowered.compile(): LEAN_CPU_OPTIONS on CPU when `lean`."""
    return dict(LEAN_CPU_OPTIONS) if lean and (backend or jax.default_backend()) == "cpu" else {}
