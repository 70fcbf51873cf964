"""The 3D-only scan pipeline: readers for every format, pseudo-labelled chunks, splits, train → inference, sweep."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from scans import build_dataset, inference, sweep, train
from scans.build_dataset import ScanDatasetConfig, build, load, normalise_chunk
from scans.readers import ScanFormatError, read_points

CHUNK = 4096


def make_scan(seed: int, rows: int = 96, cols: int = 128) -> np.ndarray:
    """A profilometer scan of a foam cut, row by row: a wavy surface with noise, burrs, a gap and a displaced
    cluster (metres)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols] * 5e-4
    z = 0.002 * np.sin(x * 80 + seed) + 0.001 * np.cos(y * 60) + rng.normal(0, 2e-5, x.shape)
    r, c = rng.integers(2, rows - 2), rng.integers(1, cols - 1)
    z[r - 1 : r + 2, c] += 0.02  # burr
    z[(r + 5) % rows, 5:9] -= 0.015  # gap-like cut
    x[2:4, -6:-3] += 0.01  # displaced cluster
    return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)


# --- writers, independent of the readers -----------------------------------------------------------------------------

def write_ply(path: Path, points: np.ndarray, binary: bool) -> None:
    extra = np.arange(len(points), dtype=np.float32)
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", f"element vertex {len(points)}",
              "property float x", "property float y", "property float z", "property float intensity",
              "element face 0", "property list uchar int vertex_indices", "end_header"]
    with path.open("wb") as handle:
        handle.write(("\n".join(header) + "\n").encode())
        for p, e in zip(points.astype(np.float32), extra):
            handle.write(struct.pack("<4f", *p, e) if binary else f"{p[0]} {p[1]} {p[2]} {e}\n".encode())


def write_pcd(path: Path, points: np.ndarray, binary: bool) -> None:
    header = ["# .PCD v0.7", "VERSION 0.7", "FIELDS x y z rgb", "SIZE 4 4 4 4", "TYPE F F F U", "COUNT 1 1 1 1",
              f"WIDTH {len(points)}", "HEIGHT 1", "VIEWPOINT 0 0 0 1 0 0 0", f"POINTS {len(points)}",
              f"DATA {'binary' if binary else 'ascii'}"]
    with path.open("wb") as handle:
        handle.write(("\n".join(header) + "\n").encode())
        for p in points.astype(np.float32):
            handle.write(struct.pack("<3fI", *p, 7) if binary else f"{p[0]} {p[1]} {p[2]} 7\n".encode())


def write_any(path: Path, points: np.ndarray) -> None:
    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, points)
    elif suffix == ".csv":
        path.write_text("x,y,z,intensity\n" + "".join(f"{a!r},{b!r},{c!r},1\n" for a, b, c in points.tolist()))
    elif suffix in (".xyz", ".txt"):
        path.write_text("# scan\n" + "".join(f"{a!r} {b!r} {c!r}\n" for a, b, c in points.tolist()))
    elif suffix == ".ply":
        write_ply(path, points, binary="bin" in path.stem)
    else:
        write_pcd(path, points, binary="bin" in path.stem)


@pytest.mark.parametrize("name", ["a.ply", "a_bin.ply", "a.pcd", "a_bin.pcd", "a.xyz", "a.txt", "a.csv", "a.npy"])
def test_readers_keep_points_and_order(tmp_path: Path, name: str):
    points = make_scan(0, rows=8, cols=9)
    write_any(tmp_path / name, points)
    exact = name.endswith((".npy", ".csv", ".xyz", ".txt"))
    expected = points if exact else points.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(read_points(tmp_path / name), expected, rtol=0, atol=1e-7 if not exact else 0)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.ply", b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\n", "end_header"),
        ("a.ply", b"ply\nformat binary_big_endian 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                  b"property float z\nend_header\n\0\0\0\0\0\0\0\0\0\0\0\0", "not supported"),
        ("a.ply", b"ply\nformat binary_little_endian 1.0\nelement vertex 5\nproperty float x\nproperty float y\n"
                  b"property float z\nend_header\n\0\0\0\0", "truncated"),
        ("a.pcd", b"FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nPOINTS 1\nDATA binary_compressed\n\0", "binary_compressed"),
        ("a.pcd", b"FIELDS a b c\nPOINTS 1\nDATA ascii\n1 2 3\n", "no x, y and z"),
        ("a.xyz", b"1 2 3\n4 five 6\n", r"a\.xyz:2: not numeric"),
        ("a.csv", b"1,2\n", "fewer than 3"),
        ("a.stl", b"solid", "unsupported file type"),
    ],
)
def test_malformed_files_are_clear_errors(tmp_path: Path, name: str, content: bytes, message: str):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ScanFormatError, match=message):
        read_points(tmp_path / name)


def test_npy_of_wrong_shape(tmp_path: Path):
    np.save(tmp_path / "a.npy", np.zeros((4, 2)))
    with pytest.raises(ScanFormatError, match=r"expected an \(N, 3\) array"):
        read_points(tmp_path / "a.npy")


def test_normalise_chunk():
    chunk = np.random.default_rng(0).normal(size=(100, 3)) * [1, 5, 0.01] + [0.3, -2, 0.5]
    normalised = normalise_chunk(chunk)
    np.testing.assert_allclose(normalised.min(axis=0), -1.0)
    np.testing.assert_allclose(normalised.max(axis=0), 1.0)
    np.testing.assert_allclose(normalise_chunk(np.ones((4, 3))), 0.0)


@pytest.fixture(scope="module")
def scans_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scans")
    for seed, name in enumerate(["s0.npy", "s1_bin.ply", "s2.pcd", "s3.xyz"]):
        write_any(folder / name, make_scan(seed, rows=128, cols=160))  # 20480 points: 5 chunks each
    return folder


@pytest.mark.parametrize("layout", ["one line", "odd grid"])
def test_chunks_keep_every_point_whatever_their_normalised_coordinates(layout: str):
    """A line scanner records one constant y per line: a one-line chunk normalises y to 0 everywhere; a regular grid
    with an odd number of columns puts its middle column at x = 0. No point of a chunk is missing."""
    from networks.features import MultimodalFeatures
    from scans.model import chunk_parts, scan_extractor_config

    side = 64
    rng = np.random.default_rng(0)
    if layout == "one line":
        chunk = np.stack([np.arange(side * side, dtype=float), np.full(side * side, 7.0),
                          rng.normal(size=side * side)], axis=1)
    else:  # 65 columns: the middle one normalises to x = 0
        index = np.arange(side * side)
        chunk = np.stack([index % 65, index // 65, rng.normal(size=side * side)], axis=1).astype(float)
    normalised = normalise_chunk(chunk)[None].astype(np.float32)
    assert (normalised == 0).any(axis=-1).sum() >= 63, "the layout puts coordinates at exactly 0"
    extractor = MultimodalFeatures(scan_extractor_config("tiny", side * side), random_init=True, modality="xyz")
    (part,) = chunk_parts(extractor, normalised)
    assert part.pixel_index.tolist() == list(range(side * side))


def test_seed_reaches_the_isolation_forest(scans_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seeds = []
    original = build_dataset.IsolationForest

    def recording_forest(**kwargs):
        seeds.append(kwargs["random_state"])
        return original(**kwargs)

    monkeypatch.setattr(build_dataset, "IsolationForest", recording_forest)
    build(scans_dir, tmp_path, ScanDatasetConfig(detector="iso", chunk_size=CHUNK, seed=7))
    assert seeds and set(seeds) == {7}


def test_build_chunks_labels_and_split(scans_dir: Path, tmp_path: Path):
    config = ScanDatasetConfig(detector="hybrid", level="high", chunk_size=CHUNK, tau=0.0002)
    data = build(scans_dir, tmp_path, config)
    assert data.chunks.shape == (20, CHUNK, 3) and data.chunks.dtype == np.float32
    assert np.all(np.abs(data.chunks) <= 1.0 + 1e-6)
    np.testing.assert_array_equal(data.labels, (data.masks.mean(axis=1) >= 0.0002).astype(int))
    assert data.labels.sum() > 0 and set(data.split) <= {"train", "test"}
    assert np.all(data.split[data.labels == 1] == "test"), "every anomalous chunk is a test chunk"
    normal_test = np.sum((data.split == "test") & (data.labels == 0))
    assert normal_test == int(np.ceil(0.1 * np.sum(data.labels == 0)))
    assert list(data.offset[:5]) == [0, CHUNK, 2 * CHUNK, 3 * CHUNK, 4 * CHUNK]
    reloaded, reloaded_config = load(tmp_path)
    assert reloaded_config == config and np.array_equal(reloaded.chunks, data.chunks)
    summary = json.loads((tmp_path / "dataset.json").read_text())
    assert "not human inspection" in summary["labels"]


def test_split_by_scan_keeps_scans_apart(scans_dir: Path, tmp_path: Path):
    data = build(scans_dir, tmp_path, ScanDatasetConfig(chunk_size=CHUNK, tau=0.0002, split_by_scan=True))
    train_scans, test_scans = set(data.scan[data.split == "train"]), set(data.scan[data.split == "test"])
    assert train_scans and test_scans and not train_scans & test_scans
    assert np.all(data.labels[data.split == "unused"] == 1)


@pytest.mark.parametrize("preset", ["tiny", "lite"])
def test_train_and_inference(scans_dir: Path, tmp_path: Path, preset: str):
    assert build_dataset.main([str(scans_dir), "--out", str(tmp_path / "data"), "--chunk_size", str(CHUNK),
                               "--tau", "0.0002", "--detector", "lof"]) == 0
    model = ["--data", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "dec.pth"), "--preset", preset,
             *(["--random_init"] if preset == "tiny" else []), "--device", "cpu"]
    assert train.main([*model, "--epochs_no", "2", "--batch_size", "4"]) == 0
    assert list((tmp_path / "data").glob("scan_features_*.pt")), "train features cached"
    run = "NaN_sweep"  # a name with "NaN" in it stays as it is (only NaN values become null)
    readme_way = ["--data", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "dec.pth"), "--device", "cpu"]
    assert inference.main([*readme_way, "--results_dir", str(tmp_path / "res"), "--run_name", run,
                           "--save_maps"]) == 0, "preset and random_init come from the checkpoint's sidecar"
    metrics = json.loads((tmp_path / "res" / run / "metrics.json").read_text())
    assert metrics["config"]["run_name"] == run
    assert metrics["config"]["preset"] == preset and metrics["config"]["random_init"] == (preset == "tiny")
    for key in ("I-AUROC", "P-AUROC", "AUPRO@30%"):  # the test chunks hold both labels: every metric is defined
        assert metrics[key] is not None and 0.0 <= metrics[key] <= 1.0
    assert metrics["n_test"] >= metrics["n_anomalous"] > 0 and metrics["fps"] > 0
    assert len(list((tmp_path / "res" / run / "maps").glob("*.png"))) == metrics["n_test"]


def test_inference_refuses_a_checkpoint_of_another_configuration(scans_dir: Path, tmp_path: Path):
    assert build_dataset.main([str(scans_dir), "--out", str(tmp_path / "data"), "--chunk_size", str(CHUNK),
                               "--tau", "0.0002"]) == 0
    model = ["--data", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "dec.pth"), "--device", "cpu"]
    assert train.main([*model, "--preset", "tiny", "--random_init", "--epochs_no", "1"]) == 0
    sidecar = json.loads((tmp_path / "dec.json").read_text())
    sidecar["feature_fingerprint"] = "0" * 64
    (tmp_path / "dec.json").write_text(json.dumps(sidecar))
    assert inference.main([*model, "--preset", "tiny", "--random_init", "--results_dir", str(tmp_path)]) == 1


def test_inference_flag_contradicting_the_checkpoint_is_an_error(scans_dir: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture):
    assert build_dataset.main([str(scans_dir), "--out", str(tmp_path / "data"), "--chunk_size", str(CHUNK),
                               "--tau", "0.0002"]) == 0
    model = ["--data", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "dec.pth"), "--device", "cpu"]
    assert train.main([*model, "--preset", "tiny", "--random_init", "--epochs_no", "1"]) == 0
    with caplog.at_level(logging.ERROR):
        assert inference.main([*model, "--preset", "paper", "--results_dir", str(tmp_path)]) == 1
    assert "--preset paper contradicts the trained run's preset 'tiny'" in caplog.text


def test_sweep_writes_table8(scans_dir: Path, tmp_path: Path):
    args = [str(scans_dir), "--out", str(tmp_path), "--detectors", "iso", "--chunk_sizes", str(CHUNK), "--levels",
            "low", "high", "--epochs_no", "1", "--preset", "tiny", "--random_init", "--device", "cpu"]
    assert sweep.main(args) == 0
    table = (tmp_path / "table8.md").read_text()
    assert "| iso | 4096 | low |" in table and "| iso | 4096 | high |" in table
    assert len((tmp_path / "table8.csv").read_text().splitlines()) == 3


def test_lite_reads_organised_chunks_as_geometry_images_and_others_with_fpfh(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture):
    """Scans that are rasters of 64-point lines make 64 × 64 chunks whose rows are scan lines: a grid of the
    surface, read by the geometry images. Without --line_points the layout is file order, read with FPFH."""
    from networks.extractors.fpfh import FPFHConfig
    from networks.extractors.geometry_images import GeometryImagesConfig
    from scans.model import build_extractor, chunk_parts, scan_extractor_config

    assert isinstance(scan_extractor_config("lite", CHUNK).xyz, FPFHConfig)
    organised = scan_extractor_config("lite", CHUNK, organised=True)
    assert isinstance(organised.xyz, GeometryImagesConfig) and organised.img_size == 64
    assert ScanDatasetConfig(chunk_size=CHUNK, line_points=64).organised
    assert not ScanDatasetConfig(chunk_size=CHUNK, line_points=128).organised
    assert not ScanDatasetConfig(chunk_size=CHUNK).organised

    scans = tmp_path / "scans"
    scans.mkdir()
    for seed in range(3):
        np.save(scans / f"s{seed}.npy", make_scan(seed, rows=192, cols=64))
    data = tmp_path / "data"
    assert build_dataset.main([str(scans), "--out", str(data), "--chunk_size", str(CHUNK), "--line_points", "64",
                               "--tau", "0.0002", "--detector", "lof"]) == 0
    model = ["--data", str(data), "--checkpoint", str(tmp_path / "dec.pth"), "--preset", "lite", "--device", "cpu"]
    assert train.main([*model, "--epochs_no", "1", "--batch_size", "4"]) == 0
    sidecar = json.loads((tmp_path / "dec.json").read_text())
    expected = build_extractor("lite", CHUNK, False, None, "cpu", organised=True).fingerprint("xyz")
    assert sidecar["feature_fingerprint"] == expected
    assert inference.main([*model, "--results_dir", str(tmp_path / "res"), "--run_name", "organised"]) == 0
    # the cached parts of the training chunks read back as they were computed
    extractor = build_extractor("lite", CHUNK, False, None, "cpu", organised=True)
    chunks = load(data)[0].chunks[:2]
    fresh = extractor.xyz_maps(chunk_parts(extractor, chunks, tmp_path / "cache"))
    assert torch.equal(extractor.xyz_maps(chunk_parts(extractor, chunks, tmp_path / "cache")), fresh)
    assert len(list((tmp_path / "cache").glob("scan_features_*.pt"))) == 1

    with caplog.at_level(logging.ERROR):
        assert build_dataset.main([str(scans), "--out", str(tmp_path / "bad"), "--chunk_size", str(CHUNK),
                                   "--line_points", "100"]) == 1
    assert "not whole scan lines of --line_points 100" in caplog.text
