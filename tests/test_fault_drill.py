"""The fault drill at its smallest size (scripts/fault_drill.py; docs/fault_drill.md): a watched folder fed bad,
slow, late, vanishing and many files, then a soak of a few hundred parts with its memory sampled; train.py killed up
to 5 times at random moments and twice inside a checkpoint write, and resumed bit for bit; two processes on one
cache; writes onto a full device (where a tmpfs can be mounted); checkpoints of another method, preset or seed and a
truncated one. Every row must keep what was written and recover without manual steps."""

from __future__ import annotations

import json
from pathlib import Path

from scripts import fault_drill


def test_the_fault_drill_finds_nothing_lost_and_everything_recovered(tmp_path: Path):
    status = fault_drill.main(["--work", str(tmp_path / "drill"), "--size", "smallest"])
    rows = json.loads((tmp_path / "drill" / "drill.json").read_text())
    failed = [row for row in rows if not (row["intact"] and row["recovered"])]
    assert status == 0 and not failed, failed
    faults = " ".join(row["fault"] for row in rows)
    for fault in ("written in pieces", "truncated", "notimage", "othersize", "2 s after", "deleted", "many parts",
                  "a soak", "train.py killed", "inside a write of the resume state",
                  "inside a write of the final checkpoints", "one --cache_dir", "full device", "another method",
                  "another preset", "another seed", "truncated checkpoint"):
        assert fault in faults, fault
