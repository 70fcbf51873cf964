"""A fault drill: what a station and a training run survive, on a small synthetic class with ``--preset lite``.

    python scripts/fault_drill.py [--work DIR] [--size full|smallest] [--seed 0]

Each fault is done for real — a watched folder fed bad and slow files, ``train.py`` killed with SIGKILL, two
processes on one feature cache, writes onto a full device, checkpoints that belong to another run — and every
result, checkpoint and cache file is read back afterwards. One Markdown row per fault: what was done, what the
program did, whether anything already written was lost or corrupted, whether the next run recovered without
manual steps. docs/fault_drill.md holds the table of this machine; tests/test_fault_drill.py runs the drill at
``--size smallest``. Exit status 1 when a row fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch

from networks.features import MultimodalFeatures
from utils.data.mvtec3d import MVTec3DDataset, collate_samples
from utils.data.synthetic import SyntheticConfig, generate_dataset
from utils.logs import setup_logging
from utils.runs.feature_cache import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
CLASS = "dome"


@dataclass
class Row:
    """One fault: what was done, what the program did, lost / corrupted, recovered without manual steps."""

    fault: str
    done: str
    behaviour: str
    intact: bool
    recovered: bool

    def markdown(self) -> str:
        return (f"| {self.fault} | {self.done} | {self.behaviour} | {'nothing' if self.intact else 'YES'} | "
                f"{'yes' if self.recovered else 'NO'} |")


@dataclass(frozen=True)
class Size:
    n_train: int
    n_test: int
    epochs: int
    bulk: int  # parts dropped into the watched folder at once
    soak: int  # parts fed to the watched folder one after another
    soak_rate: float  # parts a second

    @property
    def train_args(self) -> list[str]:
        return ["--class_name", CLASS, "--preset", "lite", "--epochs_no", str(self.epochs), "--device", "cpu"]


SIZES = {"full": Size(n_train=8, n_test=12, epochs=6, bulk=200, soak=3000, soak_rate=10.0),
         "smallest": Size(4, 6, 4, 20, 200, 25.0)}
SOAK_SLOPE_LIMIT = 10.0  # MB per 1000 parts: below it a line can run for weeks
# Resident memory moves by a few MB without any leak (allocator arenas, buffers): a fitted growth below this over the
# sampled parts cannot be told from noise, so a short soak's slope is judged by the growth it implies.
SOAK_NOISE_MB = 16.0


def command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / script), *args]


def run(cmd: list[str], log: Path) -> int:
    with log.open("a") as handle:
        return subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def run_until_written(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run a train.py; its exit status and the seconds until it logged its checkpoints written (the kills' random
    moments are drawn from these: the interpreter's exit after them takes another second or more on this
    machine, and a kill there finds nothing to break)."""
    start, written = time.monotonic(), None
    with log.open("a") as handle:
        process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    while process.poll() is None:
        if written is None and "checkpoints written" in log.read_text():
            written = time.monotonic() - start
        time.sleep(0.05)
    return process.returncode, written if written is not None else time.monotonic() - start


def side_by_side(commands: list[list[str]], logs: list[Path]) -> list[int]:
    """Run ``commands`` at once, each appending to its log; their exit statuses. For the cases that are mostly
    Python's start-up and write nowhere another reads."""
    processes = []
    for cmd, log in zip(commands, logs):
        with log.open("a") as handle:
            processes.append(subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT))
    return [process.wait() for process in processes]


def folder_bytes(folder: Path) -> dict[Path, bytes]:
    """Every file under ``folder`` and its bytes (to tell that a run left a folder as it found it)."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def module_files(run_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((run_dir / CLASS).glob("*.pth"))}


def same_weights(a: Path, b: Path) -> bool:
    """Every module file of run ``a`` equals ``b``'s, tensor by tensor, bit for bit."""
    files_a, files_b = module_files(a), module_files(b)
    if not files_a or files_a.keys() != files_b.keys():
        return False
    for name in files_a:
        sa, sb = (torch.load(files[name], weights_only=True) for files in (files_a, files_b))
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def phase(lines: list[str], epochs: int) -> str:
    """Where a killed train.py was, from the lines it had logged."""
    text = lines[-1] if lines else ""
    if (match := re.search(r"epoch (\d+)/(\d+):", text)) is not None:
        done = int(match[1])
        return f"in epoch {done + 1}" if done < epochs else "writing the checkpoints"
    if (match := re.search(r"resuming at epoch (\d+)", text)) is not None:
        return f"in epoch {match[1]}"
    if "checkpoints written" in text or "already trained" in text:
        return "after it finished"
    return "start-up / feature caching"


# --- 1. the watched folder ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def ctrl_c_reaches_children() -> Iterator[None]:
    """Children started inside get SIGINT's default: a shell that starts the drill in the background (``cmd &``)
    starts it with SIGINT ignored, which children inherit and Python then leaves ignored (the watcher's Ctrl-C would
    never arrive); a signal caught here is reset to its default in a child, without code run between fork and exec."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Watcher:
    """predict.py --watch on ``inbox``, results in ``out``."""

    def __init__(self, work: Path, run_dir: Path) -> None:
        self.inbox, self.out, self.log = work / "inbox", work / "watch_out", work / "watch.log"
        for sub in ("rgb", "xyz"):
            (self.inbox / sub).mkdir(parents=True, exist_ok=True)
        with ctrl_c_reaches_children():
            self.process = subprocess.Popen(
                command("predict.py", "--checkpoint_folder", str(run_dir), "--class_name", CLASS, "--rgb",
                        str(self.inbox / "rgb"), "--xyz", str(self.inbox / "xyz"), "--out", str(self.out), "--watch",
                        "--poll_seconds", "0.3", "--device", "cpu"),
                stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)

    def rows(self) -> list[dict]:
        path = self.out / "results.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [json.loads(line) for line in lines if line.strip()]

    def wait_for(self, condition: Callable[[list[dict]], bool], timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if condition(self.rows()):
                return True
            time.sleep(0.2)
        return False

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=60)


def watcher_faults(work: Path, run_dir: Path, dataset: Path, size: Size, rng: random.Random) -> list[Row]:
    test = sorted((dataset / CLASS / "test").glob("*/rgb/*.png"))
    source = [(p, p.parent.parent / "xyz" / f"{p.stem}.tiff") for p in test]
    watcher = Watcher(work, run_dir)
    inbox, rows = watcher.inbox, []

    def put(name: str, k: int, image: bool = True, cloud: bool = True) -> None:
        if image:
            shutil.copy(source[k % len(source)][0], inbox / "rgb" / f"{name}.png")
        if cloud:
            shutil.copy(source[k % len(source)][1], inbox / "xyz" / f"{name}.tiff")

    def rows_of(name: str) -> list[dict]:
        return [r for r in watcher.rows() if r["part"] == name]

    def scored(name: str) -> Callable[[list[dict]], bool]:
        return lambda rows: any(r["part"] == name and r["score"] is not None for r in rows)

    def failed(name: str) -> Callable[[list[dict]], bool]:
        return lambda rows: any(r["part"] == name and r["error"] for r in rows)

    # a) an image written in pieces: half, a pause longer than a poll, the rest
    data = source[0][0].read_bytes()
    shutil.copy(source[0][1], inbox / "xyz" / "slow.tiff")
    with (inbox / "rgb" / "slow.png").open("wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        time.sleep(1.5)
        handle.write(data[len(data) // 2 :])
    ok = watcher.wait_for(scored("slow"))
    errors = [r["error"] for r in rows_of("slow") if r["error"]]
    rows.append(Row("watch: a file written in pieces", "half an image, 1.5 s pause, the rest",
                    f"scored once when complete ({len(errors)} error row for the half file before)" if ok else
                    "never scored", True, ok and sum(r["score"] is not None for r in rows_of("slow")) == 1))

    # b) a truncated TIFF, c) a PNG that is not an image, e) a cloud of another size
    put("truncated", 1, cloud=False)
    cloud = source[1][1].read_bytes()
    (inbox / "xyz" / "truncated.tiff").write_bytes(cloud[: len(cloud) // 3])
    (inbox / "rgb" / "notimage.png").write_bytes(b"this is not a PNG")
    put("notimage", 2, image=False)
    put("othersize", 3, cloud=False)
    tifffile.imwrite(inbox / "xyz" / "othersize.tiff", np.full((10, 12, 3), 0.5, dtype=np.float32), photometric="rgb")
    for name, done, expect in (("truncated", "a cloud cut to a third", "truncated.tiff"),
                               ("notimage", "a .png holding text", "notimage.png"),
                               ("othersize", "a 12 × 10 cloud beside a full-size image", "differ in size")):
        ok = watcher.wait_for(failed(name))
        error = next((r["error"] for r in rows_of(name) if r["error"]), "")
        named = expect in error and (expect in watcher.log.read_text() or name in watcher.log.read_text())
        rows.append(Row(f"watch: {name}", done, f"error row: {error[:90]}" if ok else "no row",
                        True, ok and named and watcher.alive()))

    # d) an image whose cloud arrives 2 s later
    put("late", 4, cloud=False)
    time.sleep(2.0)
    early = rows_of("late")
    put("late", 4, image=False)
    ok = watcher.wait_for(scored("late"))
    rows.append(Row("watch: cloud 2 s after its image", "image, 2 s, then the cloud",
                    "waited, then scored once" if ok and not early else f"rows before the cloud: {early}", True,
                    ok and not early and len(rows_of("late")) == 1))

    # f) files deleted between listing and reading: parts appear and vanish at random moments for 3 s
    start, churned = time.monotonic(), 0
    while time.monotonic() - start < 3.0:
        put(f"ghost{churned}", churned)
        time.sleep(rng.uniform(0.0, 0.4))
        for sub, suffix in (("rgb", "png"), ("xyz", "tiff")):
            (inbox / sub / f"ghost{churned}.{suffix}").unlink(missing_ok=True)
        churned += 1
    time.sleep(1.0)
    ghost_rows = [r for r in watcher.rows() if r["part"].startswith("ghost")]
    rows.append(Row("watch: files deleted while listed", f"{churned} parts created and deleted 0–0.4 s later",
                    f"kept running; {len(ghost_rows)} of them scored or named before they vanished",
                    True, watcher.alive()))

    # g) many parts at once
    names = [f"bulk{k:03d}" for k in range(size.bulk)]
    for k, name in enumerate(names):
        put(name, k)
    ok = watcher.wait_for(lambda rows: {r["part"] for r in rows} >= set(names), timeout=30 + size.bulk)
    counts = {name: len(rows_of(name)) for name in names}
    rows.append(Row("watch: many parts at once", f"{size.bulk} parts copied in one go",
                    f"all scored, each exactly once ({sum(counts.values())} rows)" if ok else "not all scored",
                    True, ok and set(counts.values()) == {1} and all(r["score"] is not None
                                                                   for r in watcher.rows() if r["part"] in counts)))

    status = watcher.stop()
    log = watcher.log.read_text()
    whole = all(line.strip() and json.loads(line) for line in (watcher.out / "results.jsonl").read_text().splitlines())
    rows.append(Row("watch: Ctrl-C and the results", "SIGINT after the drill; results.jsonl read back",
                    f"exit {status}, no traceback" if "Traceback" not in log else "a traceback in the log",
                    whole, status == 0 and "Traceback" not in log))
    return rows


def resident_megabytes(pid: int) -> float | None:
    """The resident memory of a process (Linux /proc), or None where that cannot be read."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match[1]) / 1024 if match else None


def soak_fault(work: Path, run_dir: Path, dataset: Path, size: Size) -> list[Row]:
    """predict.py --watch fed ``size.soak`` small parts, ``size.soak_rate`` a second, its resident memory sampled:
    one result row per part (none lost or duplicated), every overlay written, memory flat after the warm-up (the
    slope of a line fitted to the samples after the first fifth of the parts)."""
    test = sorted((dataset / CLASS / "test").glob("*/rgb/*.png"))
    source = [(p, p.parent.parent / "xyz" / f"{p.stem}.tiff") for p in test]
    watcher = Watcher(work / "soak", run_dir)
    names = [f"soak{k:05d}" for k in range(size.soak)]
    samples: list[tuple[int, float]] = []  # (parts scored, resident MB)
    fed, start = 0, time.monotonic()
    while time.monotonic() - start < 60 + size.soak:  # a generous bound: the soak takes minutes at full size
        due = min(size.soak, int((time.monotonic() - start) * size.soak_rate) + 1)
        for name in names[fed:due]:
            image, cloud = source[fed % len(source)]
            shutil.copy(cloud, watcher.inbox / "xyz" / f"{name}.tiff")
            shutil.copy(image, watcher.inbox / "rgb" / f"{name}.png")
            fed += 1
        path = watcher.out / "results.jsonl"
        done = sum(1 for _ in path.open()) if path.is_file() else 0
        if (memory := resident_megabytes(watcher.process.pid)) is not None:
            samples.append((done, memory))
        if done >= size.soak or not watcher.alive():
            break
        time.sleep(0.5)
    minutes = (time.monotonic() - start) / 60
    status = watcher.stop()
    rows = watcher.rows()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["part"]] = counts.get(row["part"], 0) + 1
    complete = set(counts) == set(names) and set(counts.values()) == {1} and all(r["score"] is not None for r in rows)
    overlays = len(list((watcher.out / "overlays").glob("soak*.png")))
    after_warm_up = [(n, mb) for n, mb in samples if n >= size.soak // 5]
    if len(after_warm_up) >= 3:
        slope = float(np.polyfit([n for n, _ in after_warm_up], [mb for _, mb in after_warm_up], 1)[0]) * 1000
        growth = slope * (after_warm_up[-1][0] - after_warm_up[0][0]) / 1000
        peak = max(mb for _, mb in samples)
        memory = f"resident memory {after_warm_up[0][1]:.0f} MB after the warm-up, peak {peak:.0f} MB, slope " \
                 f"{slope:+.1f} MB per 1000 parts ({growth:+.1f} MB over the sampled parts)"
        flat = slope < SOAK_SLOPE_LIMIT or growth < SOAK_NOISE_MB
    else:
        memory, flat = "resident memory not sampled (no /proc)", True
    return [Row("watch: a soak", f"{size.soak} parts fed {size.soak_rate} a second for {minutes:.1f} min",
                f"{len(rows)} result rows, {overlays} overlays; {memory}; exit {status}",
                complete and overlays == size.soak, complete and overlays == size.soak and flat and status == 0)]


# --- 2. train.py killed ----------------------------------------------------------------------------------------------


def kill_faults(work: Path, dataset: Path, size: Size, rng: random.Random, reference: Path,
                duration: float) -> list[Row]:
    """SIGKILL train.py up to 5 times at random moments of its run (``duration``: an uninterrupted run's seconds
    until its checkpoints were written), resume each time; the final weights against ``reference``'s. A resumed run
    has less left to do and may finish before its kill: the attempts stop there (more would only restart a finished
    run, which the final run does)."""
    savepath, cache = work / "killed", work / "killed_cache"
    args = ["--dataset_path", str(dataset), *size.train_args, "--cache_dir", str(cache), "--checkpoint_savepath",
            str(savepath), "--resume"]
    phases, kills = [], 0
    for attempt in range(5):
        log = work / f"killed{attempt}.log"
        process = subprocess.Popen(command("train.py", *args), stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   cwd=ROOT)
        try:  # a random moment from late in the start-up to the checkpoints' write — unless the run ends first
            process.wait(timeout=rng.uniform(0.35, 1.0) * duration)
            phases.append("none: it finished first")
            break
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            phases.append(phase([line for line in log.read_text().splitlines() if line.strip()], size.epochs))
    log = work / "killed_final.log"
    status = run(command("train.py", *args), log)
    equal = status == 0 and same_weights(savepath, reference)
    return [Row(f"train.py killed {kills} ×", f"SIGKILL at random moments ({', '.join(phases)}), then --resume",
                f"resumed each time; final weights {'equal' if equal else 'DIFFER from'} an uninterrupted run's, "
                "bit for bit", equal, equal)]


# A train.py that SIGKILLs itself inside its ``target``-th write of a ``kind`` of checkpoint file (``resume``: the
# training state, ``module``: a trained module): half the bytes in the temporary file, then the kill (a hook on the
# write, not a random moment).
KILL_IN_WRITE = """
import io, os, signal, sys
import torch
import utils.data.io as files
from utils.runs import checkpoints
kind, target = sys.argv[1], int(sys.argv[2])
seen = 0
original = checkpoints.save_torch_atomic
def killing_save(path, obj):
    global seen
    if os.path.basename(str(path)).startswith("resume_") == (kind == "resume"):
        seen += 1
        if seen == target:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            with files.atomic_path(path) as tmp:
                with open(tmp, "wb") as handle:
                    handle.write(buffer.getbuffer()[: len(buffer.getbuffer()) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
    return original(path, obj)
checkpoints.save_torch_atomic = killing_save
import train
sys.argv = ["train.py", *sys.argv[3:]]
sys.exit(train.main())
"""


def kill_in_write_faults(work: Path, dataset: Path, size: Size, reference: Path) -> list[Row]:
    """SIGKILL train.py inside a checkpoint write, on a hook: once in the second resume-state write, once in the
    second module file of the final checkpoints; each time --resume, and the final weights against ``reference``."""
    rows = []
    for what, kind, target in (("the resume state of epoch 2", "resume", 2),
                               ("the final checkpoints (second module file)", "module", 2)):
        savepath = work / f"killed_in_write_{kind}"
        args = ["--dataset_path", str(dataset), *size.train_args, "--cache_dir", str(work / "reference_cache"),
                "--checkpoint_savepath", str(savepath), "--resume"]
        log = work / f"{savepath.name}.log"
        killed = run([sys.executable, "-c", KILL_IN_WRITE, kind, str(target), *args], log)
        leftovers = sorted(p.name for p in (savepath / CLASS).glob(".*.tmp"))
        status = run(command("train.py", *args), log)
        equal = status == 0 and same_weights(savepath, reference)
        rows.append(Row(f"train.py killed inside a write of {what}", f"SIGKILL with half the file written "
                        f"(exit {killed}), then --resume",
                        f"resumed (exit {status}); final weights {'equal' if equal else 'DIFFER from'} an "
                        f"uninterrupted run's, bit for bit; the half-written file was the temporary one "
                        f"({len(leftovers)} left behind, ignored)", equal, equal and killed == -signal.SIGKILL))
    return rows


# --- 3. one cache, two processes --------------------------------------------------------------------------------


def shared_cache_fault(work: Path, dataset: Path, size: Size) -> list[Row]:
    cache = work / "shared_cache"
    logs = [work / f"shared{k}.log" for k in range(2)]
    processes = [subprocess.Popen(command("train.py", "--dataset_path", str(dataset), *size.train_args,
                                          "--cache_dir", str(cache), "--checkpoint_savepath", str(work / f"shared{k}")),
                                  stdout=logs[k].open("w"), stderr=subprocess.STDOUT, cwd=ROOT) for k in range(2)]
    statuses = [p.wait() for p in processes]
    # every entry whole: read back and compared with a fresh computation
    extractor = MultimodalFeatures("lite", device="cpu")
    cached, fresh = FeatureCache(extractor, cache), FeatureCache(extractor, None)
    dataset_split = MVTec3DDataset(dataset, CLASS, "train", extractor.img_size,
                                   normalization=extractor.config.normalization)
    entries = sorted(cache.rglob("*.pt"))
    agree = bool(entries)
    for index in range(len(dataset_split)):
        batch = collate_samples([dataset_split[index]])
        for branch in ("rgb", "xyz"):
            a, b = cached.parts(branch, batch)[0], fresh.parts(branch, batch)[0]
            ta = a if isinstance(a, torch.Tensor) else a.features
            tb = b if isinstance(b, torch.Tensor) else b.features
            agree &= torch.equal(ta, tb)
    agree &= cached.misses == 0  # nothing had to be recomputed: no entry was cut or unreadable
    same = same_weights(work / "shared0", work / "shared1")
    return [Row("two train.py on one --cache_dir", "both started at once on the same class and cache",
                f"exit {statuses}; {len(entries)} entries, each equal to a fresh computation"
                f"{'' if agree else ' — NOT'}; both runs' weights {'equal' if same else 'differ'}",
                agree, statuses == [0, 0] and agree and same)]


# --- 4. writes that fail ----------------------------------------------------------------------------------------------


def full_device(path: Path, megabytes: int) -> bool:
    """Mount a small tmpfs at ``path`` (root on Linux); False where that is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def fill(path: Path) -> None:
    """Fill the device of ``path`` to the last byte (one file, ``filler``)."""
    with (path / "filler").open("wb", buffering=0) as handle:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError:
                pass


def write_faults(work: Path, run_dir: Path, dataset: Path, size: Size) -> list[Row]:
    device = work / "full_device"
    if not full_device(device, 24):
        return [Row("writes on a full device", "mount a small tmpfs", "skipped: mounting needs root on Linux",
                    True, True)]
    rows = []
    try:
        # a) results: an earlier session's lines, then a full device
        out, log = device / "results", work / "full_predict.log"
        images = dataset / CLASS / "test" / "good" / "rgb"
        clouds = dataset / CLASS / "test" / "good" / "xyz"
        first = sorted(images.glob("*.png"))[:1]
        run(command("predict.py", "--checkpoint_folder", str(run_dir), "--class_name", CLASS, "--rgb",
                    str(first[0]), "--xyz", str(clouds / f"{first[0].stem}.tiff"), "--out", str(out)), log)
        before = (out / "results.jsonl").read_bytes()
        fill(device)
        status = run(command("predict.py", "--checkpoint_folder", str(run_dir), "--class_name", CLASS, "--rgb",
                             str(images), "--xyz", str(clouds), "--out", str(out)), log)
        text = log.read_text()
        named = "could not write" in text and str(out) in text and "Traceback" not in text
        intact = (out / "results.jsonl").read_bytes().startswith(before)
        (device / "filler").unlink()
        again = run(command("predict.py", "--checkpoint_folder", str(run_dir), "--class_name", CLASS, "--rgb",
                            str(images), "--xyz", str(clouds), "--out", str(out)), log)
        lines = (out / "results.jsonl").read_text().splitlines()
        rows.append(Row("predict.py results on a full device", "a device filled to the last byte, then freed",
                        f"exit {status}: '{_error_line(text)}'", intact,
                        named and intact and again == 0 and len(lines) == len(set(lines))))
        shutil.rmtree(out)

        # b) checkpoints: a finished run on the device, retrained onto a full device
        savepath, log = device / "ckpt", work / "full_train.log"
        shutil.copytree(run_dir, savepath)
        before = {p.name: p.read_bytes() for p in (savepath / CLASS).iterdir()}
        fill(device)
        status = run(command("train.py", "--dataset_path", str(dataset), *size.train_args, "--cache_dir",
                             str(work / "full_cache"), "--checkpoint_savepath", str(savepath)), log)
        text = log.read_text()
        after = {p.name: p.read_bytes() for p in (savepath / CLASS).iterdir()}
        intact = after == before
        rows.append(Row("train.py checkpoints on a full device", "retraining a finished run onto a full device",
                        f"exit {status}: '{_error_line(text)}'", intact,
                        status != 0 and intact and "could not write" in text and "Traceback" not in text))
    finally:
        subprocess.run(["umount", str(device)], capture_output=True)
    return rows


def _error_line(log: str) -> str:
    line = next((line for line in reversed(log.splitlines()) if "ERROR" in line), "no error logged")
    return line.split("ERROR", 1)[-1].strip(" :")[:140]


# --- 5. checkpoints that belong to another run ------------------------------------------------------------------------


def checkpoint_faults(work: Path, run_dir: Path, dataset: Path, size: Size) -> list[Row]:
    rows = []
    common = ["--dataset_path", str(dataset), "--class_names", CLASS, "--device", "cpu", "--cache_dir",
              str(work / "inference_cache"), "--results_dir", str(work / "results"), "--epochs_no", str(size.epochs)]
    cases = [
        ("another method", ["--model", "cfm", "--checkpoint_folder", str(run_dir)], run_dir),
        ("another preset", ["--preset", "lite_fpfh", "--checkpoint_folder", str(run_dir)], run_dir),
        ("another seed", ["--seed", "1", "--checkpoint_folder", str(run_dir)], run_dir),
    ]
    truncated = work / "truncated_run"
    shutil.copytree(run_dir, truncated, dirs_exist_ok=True)
    victim = next(iter(module_files(truncated).values()))
    victim.write_bytes(victim.read_bytes()[:1000])
    cases.append(("a truncated checkpoint file", ["--checkpoint_folder", str(truncated)], truncated))
    befores = [folder_bytes(folder) for _, _, folder in cases]
    logs = [work / f"wrong_{name.replace(' ', '_')}.log" for name, _, _ in cases]
    statuses = side_by_side([command("inference.py", *common, *args) for _, args, _ in cases], logs)
    for (name, args, folder), log, status, before in zip(cases, logs, statuses, befores):
        text = log.read_text()
        message = _error_line(text)
        rows.append(Row(f"checkpoint of {name}", f"inference.py {' '.join(args[:2])}", f"exit {status}: '{message}'",
                        folder_bytes(folder) == before, status != 0 and "Traceback" not in text and message != "no error logged"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("data/fault_drill"), help="scratch folder (emptied)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--seed", type=int, default=0, help="the random moments of the kills and deletions")
    args = parser.parse_args(argv)
    os.environ["TQDM_DISABLE"] = "1"  # here and in every command the drill starts: the table is the output
    setup_logging()
    size, rng = SIZES[args.size], random.Random(args.seed)
    if args.work.exists():
        shutil.rmtree(args.work)
    work = args.work.resolve()
    dataset = generate_dataset(work / "data", SyntheticConfig(classes=(CLASS,), n_train=size.n_train, n_val=2,
                                                              n_test=size.n_test, size=(64, 80),
                                                              background="none"))
    reference = work / "reference"
    status, duration = run_until_written(command("train.py", "--dataset_path", str(dataset), *size.train_args,
                                                 "--cache_dir", str(work / "reference_cache"),
                                                 "--checkpoint_savepath", str(reference)), work / "reference.log")
    if status:
        print(f"the reference run failed: {work / 'reference.log'}")
        return 1
    rows = [*watcher_faults(work, reference, dataset, size, rng), *soak_fault(work, reference, dataset, size),
            *kill_faults(work, dataset, size, rng, reference, duration),
            *kill_in_write_faults(work, dataset, size, reference),
            *shared_cache_fault(work, dataset, size), *write_faults(work, reference, dataset, size),
            *checkpoint_faults(work, reference, dataset, size)]
    print("| fault | what was done | what the program did | lost or corrupted | recovered without manual steps |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(row.markdown())
    (work / "drill.json").write_text(json.dumps([row.__dict__ for row in rows], indent=2) + "\n")
    return 0 if all(row.intact and row.recovered for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
