"""The inspection tools: the predictor, threshold calibration, predict.py on files, folders and a watched folder,
per-part errors, and the HTML report rendered in headless Chromium (docs/inspecting.md)."""

from __future__ import annotations

import csv
import html
import json
import math
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import calibrate
import inference
import predict
import train
from utils.data.io import read_rgb, read_xyz
from utils.evaluation.metrics import threshold_decisions
from utils.station.calibration import (
    GoodTail, calibrate_threshold, empirical_threshold, miss_rate_threshold,
)
from utils.station.predictor import Predictor, threshold_path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cmdr run on dome (random backbones: fast; the tools, not detection, are under test here)."""
    work = tmp_path_factory.mktemp("inspection")
    assert train.main(["--dataset_path", str(synthetic_root), "--class_name", "dome", "--preset", "tiny",
                       "--random_init", "--epochs_no", "1", "--cache_dir", str(work / "cache"), "--device", "cpu",
                       "--checkpoint_savepath", str(work / "ckpt")]) == 0
    return work / "ckpt"


def test_empirical_calibration_equals_a_brute_force_quantile():
    rng = np.random.default_rng(0)
    for n, rate in ((20, 0.01), (200, 0.01), (200, 0.05), (57, 0.1), (10, 0.0)):
        scores = rng.normal(size=n)
        scores[:3] = scores[3]  # ties
        threshold = empirical_threshold(scores, rate)
        assert calibrate_threshold(scores, rate, rule="empirical") == threshold
        # brute force: the smallest candidate threshold whose false alarms (score > t) stay within floor(rate · n)
        allowed = int(np.floor(rate * n + 1e-9))
        candidates = sorted(t for t in set(scores.tolist()) if np.sum(scores > t) <= allowed)
        assert threshold == candidates[0], (n, rate)
        assert np.sum(scores > threshold) <= allowed
    with pytest.raises(ValueError):
        empirical_threshold([], 0.01)
    with pytest.raises(ValueError):
        calibrate_threshold([1.0], 1.0)


def test_tail_threshold_is_the_robust_log_normal_quantile():
    """median and MAD of the log-scores, by a plain computation; the 1 % quantile of the fitted normal."""
    scores = [1.3, 1.0, 1.24, 1.1, 1.05, 1.2, 1.15, 1.08, 1.02, 1.18, 1.11, 1.22, 1.72]  # one good outlier
    logs = sorted(math.log(s) for s in scores)
    median = logs[len(logs) // 2]
    mad = sorted(abs(v - median) for v in logs)[len(logs) // 2]
    z = 2.3263478740408408  # Φ⁻¹(0.99)
    expected = math.exp(median + 1.4826 * mad * z)
    assert calibrate_threshold(scores, 0.01) == pytest.approx(expected, rel=1e-12)
    tail = GoodTail.fit(scores)
    assert tail.false_alarm_rate(expected) == pytest.approx(0.01, rel=1e-9)
    # the outlier sets the empirical threshold (13 parts cannot show 1 %); the tail's stays with the others
    assert empirical_threshold(scores, 0.01) == 1.72 and expected < 1.5
    assert calibrate_threshold(scores[:4], 0.01) == 1.3  # fewer than 5 parts: the empirical rule


def test_tail_fit_recovers_a_log_normal_and_barely_moves_with_an_outlier():
    rng = np.random.default_rng(4)
    scores = np.exp(rng.normal(0.5, 0.2, size=4000))
    tail = GoodTail.fit(scores)
    assert tail.location == pytest.approx(0.5, abs=0.02) and tail.scale == pytest.approx(0.2, rel=0.05)
    small = scores[:30]
    with_outlier = np.append(small, small.max() * 2)
    assert calibrate_threshold(with_outlier, 0.01) == pytest.approx(calibrate_threshold(small, 0.01), rel=0.05)
    assert empirical_threshold(with_outlier, 0.01) == small.max() * 2


def test_miss_rate_threshold_and_decisions_by_brute_force():
    rng = np.random.default_rng(5)
    defective = rng.normal(3, 1, size=40)
    good = rng.normal(0, 1, size=25)
    for rate in (0.0, 0.05, 0.1, 0.3):
        threshold = miss_rate_threshold(defective, rate)
        allowed = int(np.floor(rate * 40 + 1e-9))
        assert np.sum(defective <= threshold) <= allowed  # at most the allowed misses ...
        assert np.sum(defective <= np.sort(defective)[allowed]) > allowed  # ... and no higher threshold keeps it
        scores = np.concatenate([good, defective])
        labels = np.array([0] * 25 + [1] * 40)
        rates = threshold_decisions(threshold, scores, labels)
        misses = sum(1 for s, y in zip(scores, labels) if y == 1 and not s > threshold)
        alarms = sum(1 for s, y in zip(scores, labels) if y == 0 and s > threshold)
        assert (rates["false_negatives"], rates["false_positives"]) == (misses, alarms)
        assert rates["true_positives"] + misses == 40 and rates["true_negatives"] + alarms == 25
        assert rates["miss_rate"] == misses / 40 and rates["false_alarm_rate"] == alarms / 25


def test_predictor_scores_a_part_like_inference(run: Path, synthetic_root: Path, tmp_path: Path):
    assert inference.main(["--dataset_path", str(synthetic_root), "--class_names", "dome", "--checkpoint_folder",
                           str(run), "--cache_dir", "none", "--device", "cpu", "--results_dir", str(tmp_path),
                           "--run_name", "r"]) == 0
    expected = {row["sample"]: float(row["image_score"]) for row in
                csv.DictReader((tmp_path / "r" / "scores" / "dome.csv").open())}
    predictor = Predictor.load(run, "dome", device="cpu")
    part = synthetic_root / "dome" / "test" / "crack"
    stem = sorted(p.stem for p in (part / "rgb").glob("*.png"))[0]
    result = predictor(rgb=part / "rgb" / f"{stem}.png", xyz=part / "xyz" / f"{stem}.tiff")
    assert result.error is None and result.decision is None  # not calibrated yet
    assert result.score == pytest.approx(expected[f"crack/{stem}"], rel=1e-5)
    assert result.anomaly_map.shape == read_rgb(part / "rgb" / f"{stem}.png").shape[:2]  # native resolution
    # arrays work too, and the part's own problems come back as errors while the predictor keeps serving
    assert predictor(rgb=read_rgb(part / "rgb" / f"{stem}.png"), xyz=read_xyz(part / "xyz" / f"{stem}.tiff")
                     ).score == pytest.approx(result.score, rel=1e-6)
    broken = tmp_path / "broken.tiff"
    broken.write_bytes(b"II*\x00\x08\x00\x00\x00")
    empty = np.zeros((64, 80, 3), dtype=np.float32)
    errors = [predictor(rgb=part / "rgb" / f"{stem}.png").error,  # the 3D branch needs the cloud
              predictor(rgb=part / "rgb" / f"{stem}.png", xyz=broken).error,
              predictor(rgb=part / "rgb" / f"{stem}.png", xyz=empty).error,
              predictor(rgb=np.zeros((30, 30, 3), np.uint8), xyz=read_xyz(part / "xyz" / f"{stem}.tiff")).error]
    assert "needs a point cloud" in errors[0] and "broken.tiff" in errors[1]
    assert "no valid point" in errors[2] and "differ in size" in errors[3]
    bigger = np.asarray(read_rgb(part / "rgb" / f"{stem}.png")).repeat(2, 0).repeat(2, 1)
    cloud = read_xyz(part / "xyz" / f"{stem}.tiff").repeat(2, 0).repeat(2, 1)
    assert predictor(rgb=bigger, xyz=cloud).anomaly_map.shape == bigger.shape[:2]  # another size than training


def test_calibrate_by_miss_rate_on_the_test_split(run: Path, synthetic_root: Path, tmp_path: Path):
    """--miss_rate picks the largest threshold that misses at most that share of the test split's defective parts;
    the stored test decisions agree with the scores; the file is the one the predictor reads."""
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    assert calibrate.main(["--checkpoint_folder", str(folder), "--class_name", "dome", "--dataset_path",
                           str(synthetic_root), "--miss_rate", "0.2", "--device", "cpu"]) == 0
    calibration = json.loads(threshold_path(folder, "dome", 1, 1).read_text())
    test = calibration["test"]
    assert calibration["rule"] == "miss_rate" and test["miss_rate"] <= 0.2
    assert test["false_negatives"] == int(np.floor(0.2 * test["n_defective"] + 1e-9)) or test["miss_rate"] < 0.2
    assert Predictor.load(folder, "dome", device="cpu").threshold == calibration["threshold"]


def test_calibrate_then_predict_files_folders_and_a_watched_folder(run: Path, synthetic_root: Path,
                                                                   tmp_path: Path):
    assert calibrate.main(["--checkpoint_folder", str(run), "--class_name", "dome", "--dataset_path",
                           str(synthetic_root), "--false_alarm_rate", "0.01", "--device", "cpu"]) == 0
    calibration = json.loads(threshold_path(run, "dome", 1, 1).read_text())
    assert calibration["n_validation"] == 2 and calibration["validation_false_alarm_rate"] == 0
    assert 0 <= calibration["test"]["miss_rate"] <= 1 and calibration["test"]["n_good"] > 0
    predictor = Predictor.load(run, "dome", device="cpu")
    good = synthetic_root / "dome" / "validation" / "good"
    scores = [predictor(rgb=p, xyz=good / "xyz" / f"{p.stem}.tiff").score for p in sorted((good / "rgb").iterdir())]
    assert calibration["threshold"] == pytest.approx(max(scores), rel=1e-6)  # n = 2 at 1 %: the largest

    # a folder of parts, one of them without its cloud: a result line with its error, the others scored
    source = tmp_path / "line"
    every = tmp_path / "every"  # every test part of the class, named <defect>_<stem>
    for folder in ("rgb", "xyz"):
        (every / folder).mkdir(parents=True)
        for path in (synthetic_root / "dome" / "test").glob(f"*/{folder}/*"):
            shutil.copy(path, every / folder / f"{path.parent.parent.name}_{path.name}")
    shutil.copytree(every, source)
    lonely = sorted((source / "xyz").iterdir())[0]
    lonely.unlink()
    out = tmp_path / "out"
    arguments = ["--checkpoint_folder", str(run), "--class_name", "dome", "--rgb", str(source / "rgb"), "--xyz",
                 str(source / "xyz"), "--out", str(out), "--device", "cpu"]
    assert predict.main(arguments) == 0
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == len(list((source / "rgb").iterdir()))
    errored = [line for line in lines if line["error"]]
    assert [line["part"] for line in errored] == [lonely.stem] and "point cloud" in errored[0]["error"]
    assert all(line["decision"] in ("good", "anomalous") for line in lines if not line["error"])
    assert len(list((out / "overlays").glob("*.png"))) == len(lines) - 1
    assert predict.main(arguments) == 0  # a rerun scores nothing twice
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines)
    text = (out / "results.jsonl").read_text()  # a crash that cut the last line: that part is scored again
    (out / "results.jsonl").write_text(text[: text.rstrip().rfind("\n") + 12])
    assert predict.main(arguments) == 0
    rows = (out / "results.jsonl").read_text().splitlines()
    assert len(rows) == len(lines) + 1 and json.loads(rows[-1])["part"] == lines[-1]["part"]
    assert len(list(csv.DictReader((out / "results.csv").open()))) == len(lines) + 1  # the re-scored part too

    # a watched folder: parts that arrive are scored once each
    inbox = tmp_path / "inbox"
    (inbox / "rgb").mkdir(parents=True)
    (inbox / "xyz").mkdir()
    watched = tmp_path / "watched"
    thread = threading.Thread(target=predict.main, args=(["--checkpoint_folder", str(run), "--class_name", "dome",
                                                          "--rgb", str(inbox / "rgb"), "--xyz", str(inbox / "xyz"),
                                                          "--out", str(watched), "--watch", "--poll_seconds",
                                                          "0.05", "--max_parts", "2", "--device", "cpu"],),
                              daemon=True)
    thread.start()
    arrivals = sorted((every / "rgb").iterdir())[:2]
    for image in arrivals:
        shutil.copy(every / "xyz" / f"{image.stem}.tiff", inbox / "xyz")
        shutil.copy(image, inbox / "rgb")
        time.sleep(0.3)
    thread.join(timeout=120)
    assert not thread.is_alive(), "--max_parts 2 stops the watch after the two parts"
    names = [json.loads(line)["part"] for line in (watched / "results.jsonl").read_text().splitlines()]
    assert sorted(names) == sorted(p.stem for p in arrivals)


def test_a_part_whose_files_vanish_after_scoring_keeps_its_result_line(run: Path, synthetic_root: Path,
                                                                      tmp_path: Path):
    """A line empties the watched folder at any moment: a part scored just before its files went (or were replaced
    by another size) gets its result line without pictures, and the watch goes on (a CI run of the fault drill
    once saw predict.py exit here)."""
    predictor = Predictor.load(run, "dome", device="cpu")
    part = tmp_path / "part"
    shutil.copytree(synthetic_root / "dome" / "test" / "good", part)
    image, cloud = min((part / "rgb").iterdir()), min((part / "xyz").iterdir())
    writer = predict.ResultWriter(tmp_path / "out", map_scale=None, ply=True)
    result = predictor(rgb=image, xyz=cloud, name="gone")
    assert result.error is None
    image.unlink()
    cloud.unlink()
    writer.write(result, image, cloud)
    other = predictor(rgb=min((part / "rgb").iterdir()), xyz=min((part / "xyz").iterdir()), name="swapped")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(small)
    writer.write(other, small, None)
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(line["part"], line["score"]) for line in lines] == [("gone", result.score), ("swapped", other.score)]
    assert not list((tmp_path / "out").glob("*/*.p*"))  # no overlay, no PLY


def test_report_pictures_and_their_numbers_agree_with_the_results(run: Path, synthetic_root: Path, tmp_path: Path):
    """The decision, ROC and PRO pictures exist as PNG files; their captions carry metrics.json's I-AUROC and
    AUPRO@30%, and the counts on each side of the threshold, the confusion table and the detection per defect type
    equal a recount of scores/<class>.csv against the threshold. Without a calibration the threshold is the one
    calibrate.py would pick, said so."""
    from PIL import Image

    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    threshold_path(folder, "dome", 1, 1).unlink(missing_ok=True)
    for calibrated in (False, True):
        if calibrated:
            assert calibrate.main(["--checkpoint_folder", str(folder), "--class_name", "dome", "--dataset_path",
                                   str(synthetic_root), "--device", "cpu"]) == 0
        name = f"report{int(calibrated)}"
        assert inference.main(["--dataset_path", str(synthetic_root), "--class_names", "dome", "--checkpoint_folder",
                               str(folder), "--cache_dir", str(tmp_path / "cache"), "--device", "cpu",
                               "--results_dir", str(tmp_path), "--run_name", name]) == 0
        results = tmp_path / name
        page = (results / "report.html").read_text()
        metrics = json.loads((results / "metrics.json").read_text())["classes"]["dome"]
        rows = list(csv.DictReader((results / "scores" / "dome.csv").open()))
        scores = np.array([float(r["image_score"]) for r in rows])
        labels = np.array([int(r["label"]) for r in rows])
        if calibrated:
            threshold = json.loads(threshold_path(folder, "dome", 1, 1).read_text())["threshold"]
            assert f"calibrated threshold {threshold:.4g}" in page
        else:
            match = re.search(r"threshold ([0-9.e+-]+): what calibrate.py would pick from the (\d+) validation parts",
                              page)
            assert match and int(match.group(2)) == 2
            threshold = float(match.group(1))
        for picture in ("decision", "roc", "pro"):
            with Image.open(results / "report" / "dome" / f"{picture}.png") as image:
                assert image.size[0] > 200 and np.asarray(image.convert("L")).std() > 5
        captions = {kind: html.unescape(text) for kind, text in
                    re.findall(r"<figure class='(\w+)'>.*?<figcaption>(.*?)</figcaption>", page)}
        assert f"I-AUROC {100 * metrics['I-AUROC']:.1f} %" in captions["roc"]
        assert f"AUPRO@30% {100 * metrics['AUPRO@30%']:.1f} %" in captions["pro"]
        good, defective = scores[labels == 0], scores[labels == 1]
        tolerance = 10 ** -3 * abs(threshold)  # the page prints 4 digits: parts that close to it are not counted
        if np.min(np.abs(scores - threshold)) > tolerance:
            expected = (f"good {np.sum(good <= threshold)} ≤ t, {np.sum(good > threshold)} > t (false alarms); "
                        f"defective {np.sum(defective <= threshold)} ≤ t (misses), {np.sum(defective > threshold)} > t")
            assert expected in captions["decision"]
            cells = re.search(r"<table class='confusion'>.*?<th>good</th><td>(\d+)</td><td>(\d+)</td>.*?"
                              r"<th>defective</th><td>(\d+)</td><td>(\d+)</td>", page)
            assert tuple(map(int, cells.groups())) == (np.sum(good <= threshold), np.sum(good > threshold),
                                                       np.sum(defective <= threshold), np.sum(defective > threshold))
            types = [r["sample"].split("/")[0] for r in rows]
            for defect in sorted(set(types) - {"good"}):
                chosen = np.array([t == defect for t in types])
                count = f"<td>{defect}</td><td>{np.sum(scores[chosen] > threshold)} of {chosen.sum()}</td>"
                assert count in page


def read_ply(path: Path) -> tuple[list[str], np.ndarray]:
    """A binary little-endian PLY's header lines and vertices, parsed from its own header."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    types = {"float": "<f4", "uchar": "u1"}
    fields = [(line.split()[2], types[line.split()[1]]) for line in header if line.startswith("property ")]
    count = int(next(line.split()[2] for line in header if line.startswith("element vertex ")))
    vertices = np.frombuffer(data[end:], dtype=np.dtype(fields))
    assert len(vertices) == count
    return header, vertices


def test_the_defect_on_the_cloud_as_ply(run: Path, synthetic_root: Path, tmp_path: Path):
    """predict.py --ply: one vertex per valid point of the part's cloud, in raster order, at the cloud's
    coordinates, its anomaly the predictor's map at that pixel, coloured by the overlays' scale, the part's score on
    every vertex; inference.py --save_ply: a file per test part."""
    from utils.evaluation.visualization import colormap

    part = synthetic_root / "dome" / "test" / "crack"
    stems = sorted(p.stem for p in (part / "rgb").iterdir())[:2]
    source = tmp_path / "parts"
    for folder, suffix in (("rgb", ".png"), ("xyz", ".tiff")):
        (source / folder).mkdir(parents=True)
        for stem in stems:
            shutil.copy(part / folder / f"{stem}{suffix}", source / folder)
    out = tmp_path / "out"
    assert predict.main(["--checkpoint_folder", str(run), "--class_name", "dome", "--rgb", str(source / "rgb"),
                         "--xyz", str(source / "xyz"), "--out", str(out), "--ply", "--device", "cpu"]) == 0
    predictor = Predictor.load(run, "dome", device="cpu")
    scale = (predictor.calibration or {}).get("map_scale")
    rows = {r["part"]: r for r in csv.DictReader((out / "results.csv").open())}
    for stem in stems:
        header, vertices = read_ply(out / "clouds" / f"{stem}.ply")
        cloud = read_xyz(source / "xyz" / f"{stem}.tiff")
        valid = ~(cloud == 0).all(axis=-1)
        result = predictor(rgb=source / "rgb" / f"{stem}.png", xyz=source / "xyz" / f"{stem}.tiff")
        assert len(vertices) == valid.sum() and f"comment part {stem}" in header
        for axis, field in enumerate("xyz"):
            assert np.array_equal(vertices[field], cloud[..., axis][valid].astype(np.float32))
        assert np.allclose(vertices["anomaly"], result.anomaly_map[valid], rtol=1e-5, atol=1e-6)
        colours = colormap(np.clip(result.anomaly_map[valid] / (scale or result.anomaly_map.max()), 0, 1))
        assert (np.abs(np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1).astype(int)
                       - colours.astype(int)) <= 1).all()
        assert np.allclose(vertices["score"], float(rows[stem]["score"]), rtol=1e-4)
    results = tmp_path / "results"
    assert inference.main(["--dataset_path", str(synthetic_root), "--class_names", "dome", "--checkpoint_folder",
                           str(run), "--cache_dir", "none", "--device", "cpu", "--results_dir", str(results),
                           "--run_name", "r", "--save_ply"]) == 0
    written = sorted(p.stem for p in (results / "r" / "clouds" / "dome").glob("*.ply"))
    expected = sorted(f"{p.parent.parent.name}_{p.stem}" for p in (synthetic_root / "dome" / "test").glob("*/xyz/*"))
    assert written == expected
    assert len(list((results / "r" / "report" / "dome").glob("*_cloud.png"))) == 4


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is needed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run: Path, synthetic_root: Path, tmp_path: Path):
    if not threshold_path(run, "dome", 1, 1).is_file():
        assert calibrate.main(["--checkpoint_folder", str(run), "--class_name", "dome", "--dataset_path",
                               str(synthetic_root), "--device", "cpu"]) == 0
    assert inference.main(["--dataset_path", str(synthetic_root), "--class_names", "dome", "--checkpoint_folder",
                           str(run), "--cache_dir", "none", "--device", "cpu", "--results_dir", str(tmp_path),
                           "--run_name", "viewer"]) == 0
    page = tmp_path / "viewer" / "report.html"
    screenshot = tmp_path / "report.png"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([*common, f"--screenshot={screenshot}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, timeout=120)
    n_test = len(list((synthetic_root / "dome" / "test").glob("*/rgb/*.png")))
    rows = re.findall(r"<tr class=.{0,12}?><td>(\d+)</td><td>([^<]+)</td><td class=.\w+.>(\w+)</td><td>([^<]+)</td>"
                      r"<td class=.(\w+).>", dom)
    assert len(rows) == n_test, "one row per test part"
    scores = [float(row[3]) for row in rows]
    assert scores == sorted(scores, reverse=True), "parts sorted by score"
    threshold = json.loads(threshold_path(run, "dome", 1, 1).read_text())["threshold"]
    assert all(row[4] == ("anomalous" if float(row[3]) > threshold else "good") for row in rows)
    assert "I-AUROC" in dom and f"threshold {threshold:.4g}" in dom
    assert dom.count("<img") == n_test + 3 + 4, "a tile per part, the decision, ROC and PRO pictures, 4 clouds"
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.size == (1200, 1600)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10, "the screenshot shows content, not a blank page"
