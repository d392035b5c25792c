"""XLA compiler options of the steps a run executes (training, evaluation, initialisation).

    jax.jit(step, compiler_options=step_compiler_options())            # every run
    jax.jit(step, compiler_options=step_compiler_options(lean=True))   # main.py --lean_compile

On CPU, every step is compiled without XLA's YNNPACK library fusions (`xla_cpu_experimental_ynn_fusion_type=""`,
CPU_STEP_OPTIONS). jaxlib 0.10 hands dots and their neighbours to YNNPACK by default; for this model's dots (LSH
attention's [64 x 64] x [64 x 128] chunk products above all) XLA's own Eigen path is faster: a Reformer training
step at the speed benchmark's configuration P went from 5.96 to 4.85 s on 2 cores, and every preset measured
got 8-19% faster with the same loss. It also makes the running step the one the memory benchmark measures
(`reformer_jax.xla.memory_analysis.compiler_options`): YNNPACK's scratch is invisible to XLA's memory analysis.

"Lean" compilation additionally turns XLA:CPU's MLIR fusion emitters off (`xla_cpu_use_fusion_emitters`, on by
default in jaxlib 0.10): they hold a few hundred MB while they compile a Reformer step, several times the step's
own buffers at P, and the process's peak RSS keeps that high-water mark. XLA's classic emitters compile the same
computation with far less memory, but the compiled step runs slower, so it is opt-in (`main.py --lean_compile`;
`benchmarks.speed --ours=...,lean_compile` measures both). Other backends get no options either way.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import jax

CPU_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
LEAN_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def step_compiler_options(backend: Optional[str] = None, lean: bool = False) -> Dict[str, Union[str, bool]]:
    """Options for jax.jit(..., compiler_options=) / Lowered.compile(): on CPU, CPU_STEP_OPTIONS, plus
    LEAN_CPU_OPTIONS when `lean`; nothing on other backends."""
    if (backend or jax.default_backend()) != "cpu":
        return {}
    return {**CPU_STEP_OPTIONS, **(LEAN_CPU_OPTIONS if lean else {})}
