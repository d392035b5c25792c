"""The benchmarks build no training step of their own: every step they time or measure comes from the library's one
builder (`reformer_jax.training.step_builder`), so the step measured is the step main.py runs.

An AST scan of benchmarks/: no jax.jit / jax.grad / jax.value_and_grad outside the few listed below (each with why
it is not a step), and no reference to the step's own pieces (the loss, the update, the state's constructor), which
only the builder may put together.
"""

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TRANSFORMS = {"jit", "grad", "value_and_grad", "pjit"}
# The step's pieces in reformer_jax.training.step and sharding: a benchmark naming one is building a step by hand.
STEP_PIECES = {"train_step", "jit_train_step", "create_train_state", "loss_fn", "loss_and_grads", "make_optimizer",
               "abstract_train_state", "jit_sharded_step", "eval_step", "guarded_train_step"}
ALLOWED: dict = {}  # (module, function): why its jit or grad is not a step; none today
# The drivers that run or compile a training step, and the builder's entry each calls.
BUILDS = {"memory": "build_train_step", "runtime": "build_train_step", "speed_worker": "build_train_step",
          "tpu_memory": "compile_train_step", "mesh_memory": "analyze_train_step"}


def _transform(node: ast.AST) -> bool:
    """jax.jit / jit / jax.grad ... as a name or an attribute."""
    return (isinstance(node, ast.Attribute) and node.attr in TRANSFORMS) or (
        isinstance(node, ast.Name) and node.id in TRANSFORMS)


def scan(directory: Path = BENCHMARKS):
    """{(module, enclosing function): [line of each jit or grad]} and [(module, step piece, line)]."""
    transforms, pieces = {}, []
    for path in sorted(directory.rglob("*.py")):
        module = ".".join(path.relative_to(directory).with_suffix("").parts)
        tree = ast.parse(path.read_text(), str(path))
        scopes = {}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                for inner in ast.walk(fn):
                    scopes.setdefault(id(inner), getattr(fn, "name", "<lambda>"))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for decorator in fn.decorator_list:  # @jax.jit, @functools.partial(jax.jit, ...)
                if _transform(decorator) or any(_transform(n) for n in ast.walk(decorator)):
                    transforms.setdefault((module, fn.name), []).append(fn.lineno)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _transform(node.func):
                transforms.setdefault((module, scopes.get(id(node), "<module>")), []).append(node.lineno)
            name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
            if isinstance(node, ast.alias):
                name = node.name.split(".")[-1]
            if name in STEP_PIECES:
                pieces.append((module, name, getattr(node, "lineno", 0)))
    return transforms, pieces


def test_no_benchmark_jits_or_differentiates_a_step_of_its_own():
    transforms, pieces = scan()
    unlisted = {where: lines for where, lines in transforms.items() if where not in ALLOWED}
    assert not unlisted, f"jax.jit / jax.grad in benchmarks outside ALLOWED (use build_train_step): {unlisted}"
    assert not pieces, f"benchmarks name the training step's pieces (build it with build_train_step): {pieces}"


def test_the_allowed_transforms_are_still_there_and_no_loss():
    transforms, _ = scan()
    assert set(ALLOWED) <= set(transforms), "an ALLOWED entry no longer exists: drop it from the list"
    for module, function in ALLOWED:
        source = (BENCHMARKS / f"{module}.py").read_text()
        tree = ast.parse(source)
        body = next(ast.get_source_segment(source, n) for n in ast.walk(tree)
                    if isinstance(n, ast.FunctionDef) and n.name == function)
        assert "loss" not in body and "train_state" not in body, (module, function)


def test_the_drivers_take_their_step_from_the_builder():
    for module, entry in BUILDS.items():
        assert entry in (BENCHMARKS / f"{module}.py").read_text(), (module, entry)


def test_the_scan_finds_a_hand_built_step(tmp_path):
    """The scan itself: a driver that jits the loss and builds the state by hand is caught twice."""
    (tmp_path / "driver.py").write_text(
        "import functools, jax\nfrom reformer_jax.training import step as train\n\n"
        "def time_steps(config):\n"
        "    state = jax.jit(lambda k: train.create_train_state(k, config, None))(jax.random.key(0))\n"
        "    return jax.jit(functools.partial(train.train_step, config=config), donate_argnums=0), state\n")
    transforms, pieces = scan(tmp_path)
    assert transforms == {("driver", "time_steps"): [5, 6]}
    assert {name for _, name, _ in pieces} == {"create_train_state", "train_step"}
