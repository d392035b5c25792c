"""BUILD.md's multi-host example as it is typed: two processes on loopback (jax.distributed over 127.0.0.1), with
one and with two CPU devices per process, at small sizes.

The contracts: each process feeds its own rows of the global batch, so the step-4 loss of two processes equals one
process's (data:2 and fsdp:2); a checkpoint written by two processes resumes in one, and one written by one
process resumes in two, each giving the uninterrupted run's step-10 loss.
"""

import json
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Small sizes and a fixed schedule (a run stopped at step 4 and resumed follows the 10-step run's schedule).
SMALL = ["--model=transformer", "--dataset=synthetic", "--d_model=32", "--n_heads=2", "--d_ff=64", "--n_layers=1",
         "--seq_len=32", "--batch_size=4", "--schedule_steps=10", "--eval_every=0", "--checkpoint_every=2",
         "--sample_len=0", "--analyze_memory=false"]
pytestmark = pytest.mark.xdist_group("multihost")  # the processes of one test need both cores at once


def build_md_example():
    """The two command lines of BUILD.md's loopback example, as argument lists (process 1's first)."""
    text = (ROOT / "BUILD.md").read_text()
    block = next(b for b in text.split("```bash")[1:] if "127.0.0.1" in b.split("```")[0]).split("```")[0]
    lines = [shlex.split(line.rstrip(" &")) for line in block.strip().splitlines()]
    assert len(lines) == 2 and all(line[:2] == ["python", "main.py"] for line in lines), lines
    return [line[2:] for line in lines]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(workdir: Path):
    return {row["step"]: row["loss"] for row in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def main_py(args, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def two_processes(tmp_path, workdir, steps, mesh=None, host_devices=None, sizes=SMALL):
    """BUILD.md's two commands, on a free port, with the small sizes, --steps and the workdir given."""
    port = free_port()
    procs = []
    for line in build_md_example():
        args = [a.replace("23456", str(port)) for a in line]
        args = [a for a in args if not (a.startswith("--workdir=") or (mesh and a.startswith("--mesh=")))]
        args += sizes + [f"--workdir={workdir}", f"--steps={steps}"] + ([f"--mesh={mesh}"] if mesh else [])
        args += [f"--host_devices={host_devices}"] if host_devices else []
        procs.append(main_py(args, tmp_path))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs[1]  # process 0's


def one_process(tmp_path, workdir, steps):
    proc = main_py(SMALL + [f"--workdir={workdir}", f"--steps={steps}", "--mesh=data:1"], tmp_path)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    one_process(tmp, tmp / "run", 10)
    return losses(tmp / "run")


def test_two_processes_train_as_one_over_data(tmp_path, uninterrupted):
    out = two_processes(tmp_path, tmp_path / "run", 4, mesh="data:2")
    assert "devices: 2 (cpu), mesh data:2,fsdp:1,tensor:1" in out and "processes: 2" in out, out
    assert losses(tmp_path / "run")[4] == pytest.approx(uninterrupted[4], rel=1e-5)


def test_two_processes_over_fsdp_then_resumed_in_one(tmp_path, uninterrupted):
    """fsdp shards the parameters over both processes; their checkpoint, resumed by one process on one device."""
    out = two_processes(tmp_path, tmp_path / "run", 4, mesh="fsdp:2")
    assert "devices: 2 (cpu), mesh data:1,fsdp:2,tensor:1" in out and "processes: 2" in out, out
    assert losses(tmp_path / "run")[4] == pytest.approx(uninterrupted[4], rel=1e-5)
    one_process(tmp_path, tmp_path / "run", 10)
    assert losses(tmp_path / "run")[10] == pytest.approx(uninterrupted[10], rel=1e-5)


def test_one_process_checkpoint_resumed_by_build_md_example_with_two_devices_per_process(tmp_path, uninterrupted):
    """BUILD.md's two commands with --host_devices=2 (data:2,fsdp:2 over 4 devices), validating and sampling at the
    end as main.py does by default (the parameters gathered from both processes, decoded on process 0), continue a
    checkpoint one process wrote."""
    one_process(tmp_path, tmp_path / "run", 4)
    defaults = [a for a in SMALL if a not in ("--eval_every=0", "--sample_len=0")]
    out = two_processes(tmp_path, tmp_path / "run", 10, host_devices=2, sizes=defaults)
    assert "devices: 4 (cpu), mesh data:2,fsdp:2,tensor:1" in out and "resumed from" in out, out
    assert "step 10: validation loss" in out and "copy task:" in out, out
    assert losses(tmp_path / "run")[10] == pytest.approx(uninterrupted[10], rel=1e-5)
