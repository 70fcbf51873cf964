"""The exported graph (export.py, predict.py --onnx; docs/inspecting.md, "One file for the line"): the graph equals
the PyTorch path, the ONNX file run by onnxruntime equals it within 1e-4 on every synthetic part, its metadata, and
the runs and files it refuses. The onnxruntime tests are skipped without requirements-export.txt."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import calibrate
import export
from networks.features import MultimodalFeatures
from networks.graph import (
    DetectorGraph, NotExportableError, PolyphaseConvTranspose1d, as_convolution, export_problem,
)
from networks.methods.registry import build_detector
import predict
import train
from utils.data.io import read_rgb, read_xyz
from utils.station.predictor import Predictor

HAS_RUNTIME = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime", "onnxscript"))
TOLERANCE = 1e-4  # the bound on |map(onnxruntime) − map(PyTorch)|, float32


@pytest.fixture(scope="module")
def lite_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated lite cmdr run on dome (1 epoch: the graph, not detection, is under test)."""
    work = tmp_path_factory.mktemp("export")
    assert train.main(["--dataset_path", str(synthetic_root), "--class_name", "dome", "--preset", "lite",
                       "--epochs_no", "1", "--cache_dir", str(work / "cache"), "--device", "cpu",
                       "--checkpoint_savepath", str(work / "ckpt")]) == 0
    assert calibrate.main(["--checkpoint_folder", str(work / "ckpt"), "--class_name", "dome", "--dataset_path",
                           str(synthetic_root), "--device", "cpu"]) == 0
    return work / "ckpt"


@pytest.fixture(scope="module")
def onnx_file(lite_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lite_run`` exported by export.py (once: an export takes ~40 s on 2 cores)."""
    if not HAS_RUNTIME:
        pytest.skip("onnx / onnxruntime / onnxscript not installed: pip install -r requirements-export.txt")
    out = tmp_path_factory.mktemp("onnx") / "line" / "dome.onnx"
    assert export.main(["--checkpoint_folder", str(lite_run), "--class_name", "dome", "--out", str(out)]) == 0
    return out


def parts(root: Path) -> list[tuple[Path, Path]]:
    """Every (image, cloud) of dome: test, validation and training parts."""
    images = sorted((root / "dome").glob("*/*/rgb/*.png"))
    return [(p, p.parent.parent / "xyz" / f"{p.stem}.tiff") for p in images]


@pytest.mark.parametrize("kernel, padding", [(3, 1), (3, 0), (5, 2), (1, 0)])
def test_transposed_convolution_equals_its_plain_convolution(kernel: int, padding: int):
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, kernel, stride=1, padding=padding).double()
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(as_convolution(layer)(x), layer(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel, stride, padding, length", [(4, 2, 1, 7), (4, 2, 1, 98), (3, 2, 1, 5),
                                                            (5, 3, 2, 6), (4, 2, 0, 5), (6, 3, 1, 4)])
def test_strided_transposed_convolution_equals_its_polyphase_convolutions(kernel, stride, padding, length):
    """Decoder3D's stride-2 ConvTranspose1d (kernel 4, padding 1) and others, against the transposed convolution
    itself in float64."""
    torch.manual_seed(0)
    layer = nn.ConvTranspose1d(3, 5, kernel, stride=stride, padding=padding).double()
    x = torch.randn(2, 3, length, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(PolyphaseConvTranspose1d(layer)(x), layer(x), rtol=0, atol=1e-12)


def test_only_stride_one_transposed_convolutions_become_plain():
    with pytest.raises(ValueError, match="stride-1"):
        as_convolution(nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1))


def test_runs_that_are_not_one_graph_are_refused_with_the_reason():
    lite = MultimodalFeatures("lite", device="cpu")
    assert export_problem(lite, build_detector("cmdr", lite.config, "rgbxyz")) is None
    with pytest.raises(NotExportableError, match="memory-bank"):
        DetectorGraph(lite, build_detector("patchcore", lite.config, "rgbxyz"))
    tiny = MultimodalFeatures("tiny", random_init=True, device="cpu")
    with pytest.raises(NotExportableError, match="Point-MAE"):
        DetectorGraph(tiny, build_detector("cmdr", tiny.config, "rgbxyz"))
    # the 2D-only model of a Point-MAE preset reads no clouds: it is one graph
    assert export_problem(tiny, build_detector("cmdr", tiny.config, "rgb")) is None


def test_graph_equals_the_pytorch_path_batched(lite_run: Path, synthetic_root: Path):
    """DetectorGraph (batched, plain convolutions) against the predictor's path (per sample, transposed)."""
    predictor = Predictor.load(lite_run, "dome", "cpu")
    graph = DetectorGraph(predictor.extractor, predictor.model)
    batches = [predictor.batch(read_rgb(i), read_xyz(c))[0] for i, c in parts(synthetic_root)[:4]]
    with torch.no_grad():
        maps, scores = graph(torch.cat([b.rgb for b in batches]), torch.cat([b.xyz for b in batches]))
    for k, batch in enumerate(batches):
        expected_scores, expected_maps = predictor.score_batch(batch)
        np.testing.assert_allclose(maps[k].numpy(), expected_maps[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(scores[k].item(), expected_scores[0], rtol=1e-6)


def test_export_then_onnxruntime_equals_pytorch_on_every_part(lite_run: Path, onnx_file: Path,
                                                              synthetic_root: Path):
    from utils.station.onnx_model import METADATA_KEY, OnnxPredictor

    out = onnx_file
    predictor, runtime = Predictor.load(lite_run, "dome", "cpu"), OnnxPredictor.load(out, "cpu")

    # the metadata: what a line needs to feed and read the file
    import onnx

    metadata = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[METADATA_KEY])
    assert (metadata["model"], metadata["modality"], metadata["preset"], metadata["class_name"]) == (
        "cmdr", "rgbxyz", "lite", "dome")
    assert metadata["img_size"] == 224 and metadata["calibration"]["threshold"] == predictor.threshold
    assert metadata["normalization"] == {"mean": list(predictor.normalization.mean),
                                         "std": list(predictor.normalization.std)}
    assert metadata["inputs"] == {"image": ["batch", 3, 224, 224], "cloud": ["batch", 3, 224, 224]}
    assert max(metadata["export_check"].values()) < TOLERANCE

    # every part: maps within 1e-4, the same ranking of scores, the same decisions
    torch_scores, onnx_scores, batches = [], [], []
    for image, cloud in parts(synthetic_root):
        batch = predictor.batch(read_rgb(image), read_xyz(cloud))[0]
        (expected_score,), (expected_map,) = predictor.score_batch(batch)
        (score,), (anomaly_map,) = runtime.score_batch(batch)
        assert np.abs(anomaly_map - expected_map).max() <= TOLERANCE, image
        torch_scores.append(expected_score)
        onnx_scores.append(score)
        batches.append(batch)
    assert np.array_equal(np.argsort(torch_scores), np.argsort(onnx_scores))
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-5)

    # the dynamic batch axis: three parts at once (the export traced two) give what each gives alone
    feeds = {"image": np.concatenate([b.rgb.numpy() for b in batches[:3]]),
             "cloud": np.concatenate([b.xyz.numpy() for b in batches[:3]])}
    maps, scores = runtime.session.run(["anomaly_map", "score"], feeds)
    assert maps.shape == (3, 224, 224) and scores.shape == (3,)
    np.testing.assert_allclose(scores, onnx_scores[:3], rtol=1e-5)


def test_predict_with_the_onnx_file_gives_the_pytorch_results(lite_run: Path, onnx_file: Path,
                                                               synthetic_root: Path, tmp_path: Path):
    out = onnx_file
    folders = ["--rgb", str(synthetic_root / "dome/test/dent/rgb"), "--xyz", str(synthetic_root / "dome/test/dent/xyz")]
    assert predict.main(["--onnx", str(out), *folders, "--out", str(tmp_path / "onnx")]) == 0
    assert predict.main(["--checkpoint_folder", str(lite_run), "--class_name", "dome", *folders, "--out",
                         str(tmp_path / "torch")]) == 0
    rows = {}
    for name in ("onnx", "torch"):
        with (tmp_path / name / "results.csv").open() as handle:
            rows[name] = {r["part"]: r for r in csv.DictReader(handle)}
    assert rows["onnx"].keys() == rows["torch"].keys() and rows["onnx"]
    for part, row in rows["onnx"].items():
        assert row["decision"] == rows["torch"][part]["decision"] and row["decision"] in ("good", "anomalous")
        assert float(row["score"]) == pytest.approx(float(rows["torch"][part]["score"]), rel=1e-5)
        assert (tmp_path / "onnx" / "overlays" / f"{part}.png").is_file()


def test_bad_onnx_files_and_options_get_clear_errors(lite_run: Path, onnx_file: Path, synthetic_root: Path,
                                                      tmp_path: Path, caplog: pytest.LogCaptureFixture):
    part = ["--rgb", str(parts(synthetic_root)[0][0]), "--xyz", str(parts(synthetic_root)[0][1])]
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"not a model")
    assert predict.main(["--onnx", str(not_onnx), *part]) == 1
    assert "is not a readable ONNX file" in caplog.text and str(not_onnx) in caplog.text
    assert predict.main(["--onnx", str(tmp_path / "missing.onnx"), *part]) == 1
    assert "python export.py" in caplog.text

    import onnx
    from onnx import TensorProto, helper

    foreign = tmp_path / "foreign.onnx"  # a valid ONNX file that export.py did not write
    identity = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(identity, ir_version=10, opset_imports=[helper.make_opsetid("", 18)]), str(foreign))
    assert predict.main(["--onnx", str(foreign), *part]) == 1
    assert "not written by export.py" in caplog.text

    out = onnx_file
    assert predict.main(["--onnx", str(out), "--class_name", "box", *part]) == 1
    assert "exported for class 'dome', not 'box'" in caplog.text
    with pytest.raises(SystemExit):
        predict.main(["--onnx", str(out), "--checkpoint_folder", str(lite_run), *part])
