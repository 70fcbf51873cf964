"""The entry points' common start (utils/logs.py): the log format, and the objects frozen out of the garbage
collector at exit only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import atexit, gc, logging
# registered before the entry point's own handler, so it runs after it (atexit is last in, first out)
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))
from utils.logs import setup_logging
setup_logging()
setup_logging()
print("frozen while running:", gc.get_freeze_count() > 0, flush=True)
logging.getLogger("probe").info("hello")
"""


def test_an_entry_point_logs_one_line_and_freezes_the_objects_only_at_exit():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          check=True)
    assert done.stdout.splitlines() == ["frozen while running: False", "frozen at exit: True"]
    assert done.stderr.count("INFO probe: hello") == 1
