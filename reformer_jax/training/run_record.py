"""workdir/summary.json: the record of a whole run, across every invocation of main.py on its workdir.

The record holds totals over the run (steps, tokens, wall time summed over invocations), the last training and
validation figures, the last sample, and the evaluations `python -m reformer_jax.evaluate` made of its checkpoints.
It is read, changed and written back atomically (a temporary file renamed into place), and only when a value
changed, so a rerun with nothing to do leaves the file byte for byte as it was. Read-modify-write keeps what another
writer (an evaluation run beside the training) added in the meantime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from reformer_jax.errors import setting
from reformer_jax.training.checkpoint import CheckpointError, write_json_atomic

SUMMARY_FILE = "summary.json"


def read_record(workdir: Path) -> Dict[str, Any]:
    """The record in `workdir` ({} when there is none yet); an unreadable one raises CheckpointError."""
    path = Path(workdir) / SUMMARY_FILE
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); move it aside (it is rebuilt from the next "
                              f"invocation's figures) or pass another {setting('workdir')}.") from error
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; move it aside or pass another "
                              f"{setting('workdir')}.")
    return record


def update_record(workdir: Path, changes: Dict[str, Any]) -> Dict[str, Any]:
    """Merge `changes` into the record and write it back if anything changed; returns the record."""
    record = read_record(workdir)
    updated = json.loads(json.dumps({**record, **changes}))  # as saved: tuples become lists
    if updated != record:
        write_json_atomic(Path(workdir) / SUMMARY_FILE, updated)
    return updated


def with_evaluation(record: Dict[str, Any], evaluation: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The record's evaluations with `evaluation` added, replacing an earlier one of the same checkpoint, data and
    settings (so repeating an evaluation does not grow the list)."""
    key = {k: evaluation.get(k) for k in ("step", "data", "n_hashes", "batches")}
    kept = [e for e in record.get("evaluations", []) if {k: e.get(k) for k in key} != key]
    return sorted(kept + [evaluation], key=lambda e: (e.get("step", 0), str(e.get("data")), e.get("n_hashes") or 0))
