"""How far do the suite's measured numbers move between CPU code paths, and what margin do their bounds leave?

    python scripts/dispatch_spread.py [--settings native avx2 default] [--out DIR] [-- PYTEST ARGS]

Runs ``python -m pytest`` once per setting, each in a fresh process with the kernels' dispatch forced down:

* ``native``: whatever the CPU offers (AMX / AVX-512 bf16 where present);
* ``avx2``: ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` (oneDNN then emulates bf16);
* ``default``: ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=default`` (ATen's scalar kernels).

Tests that assert a learned or measured number record it with the ``check_measured`` fixture (``conftest.py``) as
a JUnit XML property, with its bound. The script prints, in Markdown, every recorded number per setting with its
spread (largest − smallest) and the smallest margin to its bound, then every test whose outcome differs between
settings. The XML files stay in ``--out`` (default: a temporary folder). Run it alone: two heavy processes on a
2-core machine slow each other many times over. ``docs/testing.md`` has the last measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

logger = logging.getLogger("dispatch_spread")

ROOT = Path(__file__).resolve().parents[1]
SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "default": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "default"},
}


def run_suite(setting: str, pytest_args: list[str], out: Path) -> Path:
    """Run pytest under ``setting``'s dispatch and return its JUnit XML file."""
    report = out / f"{setting}.xml"
    env = {**os.environ, **SETTINGS[setting], "TQDM_DISABLE": "1"}
    for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        if name not in SETTINGS[setting]:
            env.pop(name, None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *pytest_args]
    logger.info("%s: %s", setting, " ".join(f"{k}={v}" for k, v in SETTINGS[setting].items()) or "(native)")
    subprocess.run(command, cwd=ROOT, env=env, check=False)
    return report


def read_report(report: Path) -> tuple[dict[str, str], dict[tuple[str, str], dict]]:
    """(outcome per test, {(test, name): {"value", "min", "max"}}) of a JUnit XML file."""
    outcomes, measured = {}, {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        outcomes[test] = outcome
        for prop in case.iter("property"):
            try:
                measured[test, prop.get("name")] = json.loads(prop.get("value"))
            except (TypeError, json.JSONDecodeError):
                continue
    return outcomes, measured


def margin(record: dict) -> float:
    """Distance of the value to its bound (negative: the bound is violated)."""
    gaps = []
    if record.get("min") is not None:
        gaps.append(record["value"] - record["min"])
    if record.get("max") is not None:
        gaps.append(record["max"] - record["value"])
    return min(gaps) if gaps else float("nan")


def spread_table(reports: dict[str, Path]) -> str:
    """The Markdown tables described in the module docstring."""
    parsed = {setting: read_report(path) for setting, path in reports.items()}
    keys = sorted({key for _, measured in parsed.values() for key in measured})
    settings = list(reports)
    lines = ["| test | number | " + " | ".join(settings) + " | spread | bound | smallest margin |",
             "|---|---|" + "---|" * len(settings) + "---|---|---|"]
    for key in keys:
        records = [parsed[s][1].get(key) for s in settings]
        values = [r["value"] for r in records if r is not None]
        known = next(r for r in records if r is not None)
        bound = " ".join(f"{op} {known[k]:g}" for op, k in ((">=", "min"), ("<=", "max")) if known.get(k) is not None)
        cells = [f"{r['value']:.6g}" if r is not None else "–" for r in records]
        lines.append(f"| {key[0].split('.')[-1]} | {key[1]} | " + " | ".join(cells)
                     + f" | {max(values) - min(values):.3g} | {bound} | {min(margin(r) for r in records if r):.3g} |")
    tests = sorted({test for outcomes, _ in parsed.values() for test in outcomes})
    differing = [t for t in tests if len({parsed[s][0].get(t, "absent") for s in settings}) > 1]
    lines += ["", f"{len(tests)} tests; outcomes that differ between settings: {len(differing) or 'none'}"]
    lines += [f"* {t}: " + ", ".join(f"{s} {parsed[s][0].get(t, 'absent')}" for s in settings) for t in differing]
    failed = {s: sum(o in ("failed", "error") for o in parsed[s][0].values()) for s in settings}
    lines.append("failed or errored per setting: " + ", ".join(f"{s} {n}" for s, n in failed.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=None, help="where the JUnit XML files go (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="tabulate the XML files already in --out, run nothing")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: arguments for pytest")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    out = args.out or Path(tempfile.mkdtemp(prefix="dispatch_spread_"))
    out.mkdir(parents=True, exist_ok=True)
    pytest_args = [a for a in args.pytest_args if a != "--"]
    reports = {s: (out / f"{s}.xml" if args.reuse else run_suite(s, pytest_args, out)) for s in args.settings}
    missing = [str(p) for p in reports.values() if not p.is_file()]
    if missing:
        logger.error("no JUnit XML report at %s: run without --reuse", ", ".join(missing))
        return 1
    print(spread_table(reports))
    logger.info("reports in %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
