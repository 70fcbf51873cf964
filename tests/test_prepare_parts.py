"""scripts/prepare_parts.py: a folder of own parts (clouds that keep the table, several cloud formats) becomes the
MVTec 3D-AD layout; the support plane is removed like MVTec's; train.py, calibrate.py and inference.py run on it
unchanged; bad input stops with the file named and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import calibrate
import inference
import train
from scripts import prepare_parts
from utils.data.io import read_xyz
from utils.data.mvtec3d import discover_samples, is_background_removed
from utils.data.synthetic import SyntheticConfig, generate_dataset

N_GOOD = 12


@pytest.fixture(scope="module")
def own_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good parts in one flat folder (clouds as .tiff, .npy and a .pcd), defective ones in rgb/ xyz/ gt/, all with
    the table in their clouds; and the same parts generated without the table, the reference of the removal."""
    root = tmp_path_factory.mktemp("own")
    data = {}
    for background in ("table", "none"):  # the same seeds: the same parts, with and without the table
        data[background] = generate_dataset(root / background, SyntheticConfig(
            classes=("dome",), n_train=N_GOOD, n_val=0, n_test=4, background=background))
    good = root / "parts" / "good"
    good.mkdir(parents=True)
    source = data["table"] / "dome" / "train" / "good"
    for i, image in enumerate(sorted((source / "rgb").iterdir())):
        shutil.copy(image, good / image.name)
        cloud = source / "xyz" / f"{image.stem}.tiff"
        if i % 3 == 1:
            np.save(good / f"{image.stem}.npy", read_xyz(cloud))
        elif i == 2:  # one binary PCD, organised as PCL writes it
            xyz = read_xyz(cloud)
            height, width = xyz.shape[:2]
            header = (f"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH {width}\n"
                      f"HEIGHT {height}\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {width * height}\nDATA binary\n")
            (good / f"{image.stem}.pcd").write_bytes(header.encode() + xyz.astype("<f4").tobytes())
        else:
            shutil.copy(cloud, good)
    defective = root / "parts" / "defective"
    for folder in ("rgb", "xyz", "gt"):
        (defective / folder).mkdir(parents=True)
        for path in sorted((data["table"] / "dome" / "test").glob(f"[!g]*/{folder}/*")):
            shutil.copy(path, defective / folder / f"{path.parent.parent.name}_{path.name}")
    return {"good": good, "defective": defective, "reference": data["none"] / "dome" / "train" / "good"}


def test_own_parts_become_the_layout_with_the_table_removed(own_parts: dict[str, Path], tmp_path: Path):
    out = tmp_path / "data"
    assert prepare_parts.main(["--good", str(own_parts["good"]), "--defective", str(own_parts["defective"]),
                               "--out", str(out), "--class_name", "widget", "--seed", "3"]) == 0
    train_records = discover_samples(out, "widget", "train")
    validation = discover_samples(out, "widget", "validation")
    test = discover_samples(out, "widget", "test")
    assert len(validation) == 5 and len(train_records) == N_GOOD - 5, "a tenth, at least 5, held out"
    assert {r.stem for r in validation} | {r.stem for r in train_records} == {f"{i:03d}" for i in range(N_GOOD)}
    assert len(test) == len(list((own_parts["defective"] / "rgb").iterdir())) and all(r.gt_path for r in test)
    assert is_background_removed(out)
    record = json.loads((out / prepare_parts.PARTS_MARKER).read_text())["widget"]
    assert record["validation_stems"] == sorted(r.stem for r in validation)
    # the table is gone: the cleaned clouds are the parts as generated without the table, and the points each part
    # lost are recorded. MVTec's 5 mm cut takes the dome's lowest rim with it (measured: 79–94 % of the part kept);
    # a 2 mm cut keeps all of it (measured: 100 %)
    finer = tmp_path / "finer"
    assert prepare_parts.main(["--good", str(own_parts["good"]), "--out", str(finer), "--class_name", "widget",
                               "--seed", "3", "--plane_cut", "0.002"]) == 0
    for sample in train_records + validation:
        reference = (read_xyz(own_parts["reference"] / "xyz" / f"{sample.stem}.tiff") != 0).any(-1)
        for root, kept in ((out, 0.7), (finer, 0.98)):
            cleaned = (read_xyz(root / "widget" / sample.split / "good" / "xyz" / f"{sample.stem}.tiff") != 0).any(-1)
            assert (cleaned & ~reference).sum() <= 0.01 * reference.sum(), "nothing of the table is left"
            assert (cleaned & reference).sum() >= kept * reference.sum(), "the part is kept"
        assert record["points_removed"][f"good/{sample.stem}"] > reference.size / 2
    again = tmp_path / "again"  # the same seed holds out the same parts
    assert prepare_parts.main(["--good", str(own_parts["good"]), "--out", str(again), "--class_name", "widget",
                               "--seed", "3", "--keep_background"]) == 0
    kept = json.loads((again / prepare_parts.PARTS_MARKER).read_text())["widget"]
    assert kept["validation_stems"] == record["validation_stems"] and not is_background_removed(again)
    assert discover_samples(again, "widget", "train")[0].xyz_path.suffix == ".tiff"


def test_train_calibrate_and_inference_run_on_own_parts(own_parts: dict[str, Path], tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture):
    """Unchanged commands on the prepared folder: with defective parts, metrics; with good parts only, inference
    says there is nothing to measure and calibrate.py still fits its threshold."""
    out = tmp_path / "data"
    assert prepare_parts.main(["--good", str(own_parts["good"]), "--defective", str(own_parts["defective"]),
                               "--out", str(out), "--class_name", "widget"]) == 0
    shutil.copytree(out / "widget", out / "plain")
    shutil.rmtree(out / "plain" / "test")  # good parts only
    common = ["--dataset_path", str(out), "--preset", "tiny", "--random_init", "--epochs_no", "1", "--device", "cpu",
              "--cache_dir", str(tmp_path / "cache")]
    assert train.main([*common, "--class_name", "widget", "plain", "--checkpoint_savepath", str(tmp_path / "ckpt")]) == 0
    for name in ("widget", "plain"):
        assert calibrate.main(["--checkpoint_folder", str(tmp_path / "ckpt"), "--class_name", name,
                               "--dataset_path", str(out), "--device", "cpu"]) == 0
    assert inference.main([*common, "--class_names", "widget", "plain", "--checkpoint_folder", str(tmp_path / "ckpt"),
                           "--results_dir", str(tmp_path / "results"), "--run_name", "r"]) == 0
    metrics = json.loads((tmp_path / "results" / "r" / "metrics.json").read_text())
    assert list(metrics["classes"]) == ["widget"]
    assert "plain: no test split" in caplog.text


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def test_bad_input_names_the_file_and_writes_nothing(own_parts: dict[str, Path], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture):
    def fails(good: Path, *extra: str) -> str:
        caplog.clear()
        out = tmp_path / f"out_{len(list(tmp_path.iterdir()))}"
        assert prepare_parts.main(["--good", str(good), "--out", str(out), "--class_name", "w", *extra]) == 1
        assert not out.exists() or not any(out.rglob("*.tiff")), "nothing written"
        return caplog.text

    lonely = _copy(own_parts["good"], tmp_path / "lonely")
    image = sorted(lonely.glob("*.png"))[4]
    next(p for p in lonely.iterdir() if p.stem == image.stem and p != image).unlink()
    assert f"{image} has no partner" in fails(lonely)

    resized = _copy(own_parts["good"], tmp_path / "resized")
    cloud = sorted(resized.glob("*.npy"))[0]
    np.save(cloud, np.load(cloud)[:-8])
    assert f"{cloud}: a cloud of 200 × 152 points for the 200 × 160 image" in fails(resized)

    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(own_parts["good"].iterdir())[:10]:  # 5 parts
        shutil.copy(path, few)
    assert "5 good part(s): at least 6 are needed" in fails(few)

    partly = _copy(own_parts["defective"], tmp_path / "partly")
    mask = sorted((partly / "gt").iterdir())[0]
    mask.unlink()
    assert f"{partly / 'rgb' / mask.name}: no mask" in fails(own_parts["good"], "--defective", str(partly))
    assert "no parts" in fails(tmp_path / "lonely" / "missing") or "no such folder" in caplog.text
