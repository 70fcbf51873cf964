"""Score parts with a trained run: single files, folders, or folders being filled (docs/inspecting.md).

    python predict.py --checkpoint_folder RUN --class_name C [--rgb FILE|DIR] [--xyz FILE|DIR] [--out DIR]
        [--watch] [--poll_seconds 1] [--max_parts N] [--ply] [--epochs_no E] [--batch_size B]
        [--device auto|cpu|cuda]
    python predict.py --onnx model.onnx [--rgb FILE|DIR] [--xyz FILE|DIR] [--out DIR] [--watch] ...

Everything about the model (method, preset, extractor weights, options, the calibrated threshold of calibrate.py)
comes from the run folder, or, with ``--onnx``, from a file export.py wrote (run in onnxruntime: no checkpoint
folder, no extractor weights). With folders, an image and a cloud with the same file stem are one part (``.png`` /
``.jpg`` images; clouds organised H × W × 3 as ``.tiff`` (MVTec 3D-AD), ``.npy``, ``.pcd`` or ``.ply``:
utils.data.io.read_xyz). Each part gets one line in ``<out>/results.csv`` and ``<out>/results.jsonl``
(score, decision, error, seconds) and an overlay ``<out>/overlays/<part>.png`` (the heatmap on the image, scaled
by the run's calibration so that good parts stay dark), with ``--ply`` its cloud's valid points coloured the same
way, ``<out>/clouds/<part>.ply`` (utils.evaluation.clouds); a part already in the results is not scored again, so a
rerun continues and ``--watch`` scores each new part once, when its files have stopped growing. A part that cannot
be scored gets its error in the results and the next part is served. Without ``--out`` the lines are printed only.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from utils.data.io import CLOUD_SUFFIXES, DatasetError, InputError, WriteError, read_rgb, read_xyz
from utils.evaluation.clouds import write_anomaly_ply
from utils.evaluation.visualization import overlay, save_tiles
from utils.runs.pipeline import setup_logging
from utils.station.onnx_model import OnnxPredictor
from utils.station.predictor import PartResult, PartScorer, Predictor, add_run_arguments

logger = logging.getLogger("predict")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CSV_FIELDS = ("part", "score", "decision", "error", "seconds")


def _files(source: Path | None, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Stem → file of a file or a folder (None: nothing)."""
    if source is None:
        return {}
    if source.is_dir():
        return {p.stem: p for p in sorted(source.iterdir()) if p.suffix.lower() in suffixes and p.is_file()}
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    return {source.stem: source}


def find_parts(rgb: Path | None, xyz: Path | None) -> dict[str, tuple[Path | None, Path | None]]:
    """Part name → (image, cloud); a part may lack one of them (the predictor then says what is missing)."""
    images, clouds = _files(rgb, IMAGE_SUFFIXES), _files(xyz, CLOUD_SUFFIXES)
    if rgb is not None and xyz is not None and rgb.is_file() and xyz.is_file():
        return {rgb.stem: (rgb, xyz)}
    return {name: (images.get(name), clouds.get(name)) for name in sorted(set(images) | set(clouds))}


def _parse(line: str) -> dict | None:
    """A results.jsonl line; None for a blank or cut one (a crash mid-line: that part is scored again)."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


class ResultWriter:
    """Appends one line per part to results.csv / results.jsonl and writes its overlay; knows the parts done."""

    def __init__(self, out: Path | None, map_scale: float | None, ply: bool = False,
                 threshold: float | None = None) -> None:
        self.out, self.map_scale, self.ply, self.threshold = out, map_scale, ply, threshold
        self.done: set[str] = set()
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            lines = (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").is_file() else []
            self.done = {record["part"] for record in map(_parse, lines) if record}

    def write(self, result: PartResult, image: Path | None, cloud: Path | None = None) -> None:
        record = result.record()
        print(json.dumps(record), flush=True)
        if self.out is None:
            return
        rgb = self._read_again(read_rgb, image, result)
        if rgb is not None:
            self._overlay(result, rgb)
        points = self._read_again(read_xyz, cloud, result) if self.ply else None
        if points is not None:
            write_anomaly_ply(self.out / "clouds" / f"{result.name}.ply", points, result.anomaly_map,
                              self.map_scale or float(result.anomaly_map.max()) or 1.0, result.score, result.name,
                              self.threshold)
        csv_path = self.out / "results.csv"
        row = io.StringIO()
        writer = csv.DictWriter(row, fieldnames=CSV_FIELDS, lineterminator="\n")
        if not csv_path.is_file():
            writer.writeheader()
        writer.writerow(record)
        for path, text in ((csv_path, row.getvalue()), (self.out / "results.jsonl", json.dumps(record) + "\n")):
            try:
                with path.open("a+b") as handle:  # one whole line per write: a crash loses at most the current part
                    if handle.tell() and (handle.seek(-1, 2), handle.read(1))[1] != b"\n":
                        text = "\n" + text  # after a line cut by a crash
                    handle.write(text.encode())
            except OSError as err:
                raise WriteError(path, err) from err
        self.done.add(result.name)

    @staticmethod
    def _read_again(read: Callable[[Path], np.ndarray], path: Path | None, result: PartResult) -> np.ndarray | None:
        """A scored part's file read again for its picture; None without a map, or with a warning when the file
        vanished or changed since it was scored (a watched folder emptied by the line): the result line is
        written all the same."""
        if path is None or result.anomaly_map is None:
            return None
        try:
            data = read(path)
        except DatasetError as err:
            logger.warning("%s: no picture, its file could not be read again (%s)", result.name, err)
            return None
        if data.shape[:2] != result.anomaly_map.shape:
            logger.warning("%s: no picture, %s was replaced by one of another size since it was scored",
                           result.name, path)
            return None
        return data

    def _overlay(self, result: PartResult, rgb: np.ndarray) -> None:
        scale = self.map_scale or float(result.anomaly_map.max()) or 1.0
        heat = np.clip(result.anomaly_map / scale, 0, 1)
        title = f"{result.name}  score {result.score:.4g}" + (f"  {result.decision}" if result.decision else "")
        save_tiles(self.out / "overlays" / f"{result.name}.png", [[rgb, overlay(rgb, heat)]], ["part", "anomaly map"],
                   title)


def signature(files: tuple[Path | None, ...]) -> dict[Path, tuple[int, int]] | None:
    """(size, modification time) of each of a part's files; None when one has vanished since it was listed."""
    current = {}
    for path in files:
        if path is not None:
            try:
                status = path.stat()
            except FileNotFoundError:
                return None
            current[path] = (status.st_size, status.st_mtime_ns)
    return current


def ready(parts: dict[str, tuple[Path | None, Path | None]], seen: dict[Path, tuple[int, int]]) -> list[str]:
    """Parts whose files kept their size and modification time since the last look (a file still being copied is
    left for later, a file deleted since the listing is forgotten); ``seen`` is updated."""
    names = []
    for name, files in parts.items():
        current = signature(files)
        if current is None:
            continue
        if all(seen.get(p) == mark for p, mark in current.items()):
            names.append(name)
        seen.update(current)
    return names


def score_part(predictor: PartScorer, name: str, image: Path | None, cloud: Path | None) -> PartResult:
    """The predictor's result; an unexpected exception becomes the part's error too (a station keeps serving)."""
    try:
        return predictor(rgb=image, xyz=cloud, name=name)
    except Exception as err:  # noqa: BLE001 - anything a part brings; its traceback goes to the log
        logger.exception("%s: unexpected error", name)
        return PartResult(name, error=f"{type(err).__name__}: {err}")


def load_scorer(args: argparse.Namespace) -> PartScorer:
    """The run of ``--checkpoint_folder`` in PyTorch, or the ``--onnx`` file in onnxruntime."""
    if args.onnx is None:
        return Predictor.load(args.checkpoint_folder, args.class_name, args.device, args.epochs_no, args.batch_size)
    scorer = OnnxPredictor.load(args.onnx, args.device)
    if args.class_name is not None and args.class_name != scorer.class_name:
        raise InputError(f"{args.onnx} was exported for class {scorer.class_name!r}, not {args.class_name!r}")
    return scorer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, required=False)
    parser.add_argument("--onnx", type=Path, help="a file export.py wrote, instead of --checkpoint_folder")
    parser.add_argument("--class_name", help="the run's class (with --onnx: the file's, checked when given)")
    parser.add_argument("--rgb", type=Path, help="an image file or a folder of images")
    parser.add_argument("--xyz", type=Path, help="a cloud file (.tiff, .npy, .pcd, .ply: organised) or a folder of clouds")
    parser.add_argument("--out", type=Path, help="folder for results.csv, results.jsonl and overlays/")
    parser.add_argument("--watch", action="store_true", help="keep scoring new parts that appear (Ctrl-C stops)")
    parser.add_argument("--poll_seconds", type=float, default=1.0, help="how often --watch looks for new parts")
    parser.add_argument("--max_parts", type=int, default=0,
                        help="stop after scoring this many parts (0: no limit; --watch runs until Ctrl-C)")
    parser.add_argument("--ply", action="store_true",
                        help="also write each part's cloud coloured by its anomaly map (<out>/clouds/<part>.ply)")
    args = parser.parse_args(argv)
    if args.rgb is None and args.xyz is None:
        parser.error("give --rgb and/or --xyz")
    if (args.checkpoint_folder is None) == (args.onnx is None):
        parser.error("give either --checkpoint_folder (with --class_name) or --onnx")
    if args.onnx is not None and (args.epochs_no or args.batch_size):
        parser.error("--epochs_no and --batch_size pick a run in a checkpoint folder; an --onnx file is one run")
    if args.checkpoint_folder is not None and args.class_name is None:
        parser.error("--checkpoint_folder needs --class_name")
    if args.ply and args.out is None:
        parser.error("--ply writes into --out: give --out")
    setup_logging()
    try:
        predictor = load_scorer(args)
        if predictor.threshold is None:
            logger.warning("no calibrated threshold for this run: scores without decisions (run calibrate.py)")
        writer = ResultWriter(args.out, (predictor.calibration or {}).get("map_scale"), args.ply, predictor.threshold)
        seen: dict[Path, tuple[int, int]] = {}
        failed: dict[str, dict | None] = {}  # --watch: part → its files' signature when it failed
        scored = 0
        while True:
            parts = {n: f for n, f in find_parts(args.rgb, args.xyz).items()
                     if n not in writer.done or (n in failed and signature(f) != failed[n])}
            if args.watch:  # a part whose cloud (or image) has not arrived yet waits for it
                parts = {n: (image, cloud) for n, (image, cloud) in parts.items()
                         if (image is not None or not predictor.needs_rgb)
                         and (cloud is not None or not predictor.needs_xyz)}
            for name in ready(parts, seen) if args.watch else parts:
                image, cloud = parts[name]
                result = score_part(predictor, name, image, cloud)
                writer.write(result, image, cloud)
                failed.pop(name, None)
                if result.error is not None and args.watch:
                    # a file completed or replaced later (a slow copy that paused) is scored again
                    failed[name] = signature((image, cloud))
                scored += 1
                if scored == args.max_parts:
                    return 0
            if not args.watch:
                return 0
            time.sleep(args.poll_seconds)
    except InputError as err:  # the run or the paths given; a part's own problems are in its result line
        logger.error("%s", err)
        return 1
    except KeyboardInterrupt:
        logger.info("stopped")
        return 0


if __name__ == "__main__":
    sys.exit(main())
