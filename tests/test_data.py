"""Data loading in the MVTec 3D-AD layout: pairing, order, transforms, batching and bad-input errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from utils.data.io import DatasetError, read_mask, read_xyz
from utils.data.mvtec3d import (
    MVTec3DDataset, collate_samples, discover_samples, main, make_dataloader, resolve_class_names,
)
from utils.data.synthetic import SyntheticConfig
from utils.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, mask_to_tensor, pad_to_square, rgb_to_tensor, xyz_to_tensor,
)

IMG_SIZE = 32


# --- transforms, against independent computations ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 7), (6, 3), (4, 4), (5, 8, 3)])
def test_pad_to_square_replicates_edges_centred(shape: tuple[int, ...]):
    array = np.arange(np.prod(shape)).reshape(shape)
    padded = pad_to_square(array)
    height, width = shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    expected = np.empty((side, side) + shape[2:], dtype=array.dtype)
    for i in range(side):  # literal definition: clamp every output index into the source
        for j in range(side):
            expected[i, j] = array[min(max(i - top, 0), height - 1), min(max(j - left, 0), width - 1)]
    np.testing.assert_array_equal(padded, expected)


def test_rgb_transform_matches_torchvision_pipeline():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    expected = TF.normalize(
        TF.to_tensor(TF.resize(Image.fromarray(pad_to_square(rgb)), [24, 24], TF.InterpolationMode.BICUBIC)),
        IMAGENET_MEAN, IMAGENET_STD,
    )
    actual = rgb_to_tensor(rgb, 24)
    assert actual.shape == (3, 24, 24) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(160, 200), (37, 23), (64, 64)])
def test_xyz_is_zero_padded_then_nearest_resized(size: tuple[int, int]):
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=size + (3,)).astype(np.float32)
    side = max(size)
    square = np.zeros((side, side, 3), dtype=np.float32)
    top, left = (side - size[0]) // 2, (side - size[1]) // 2
    square[top : top + size[0], left : left + size[1]] = xyz
    out = 56
    index = (np.arange(out) * side) // out  # torch "nearest": src = floor(dst * in / out)
    expected = torch.from_numpy(square[index][:, index]).permute(2, 0, 1)
    torch.testing.assert_close(xyz_to_tensor(xyz, out), expected, rtol=0, atol=0)


def test_mask_is_padded_then_resized_and_binary():
    mask = np.zeros((40, 20), dtype=bool)
    mask[:, -1] = True  # the right edge column is replicated into the right padding
    tensor = mask_to_tensor(mask, 20)
    assert tensor.shape == (1, 20, 20)
    assert set(tensor.unique().tolist()) == {0.0, 1.0}
    assert tensor[0, :, -5:].all() and not tensor[0, :, :14].any()


# --- readers ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [(0, 255), (0, 1), (0, 128)])
def test_any_nonzero_mask_value_is_anomalous(tmp_path: Path, values: tuple[int, int]):
    array = np.full((5, 6), values[0], dtype=np.uint8)
    array[1:3, 2:4] = values[1]
    Image.fromarray(array).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), array > 0)


def test_bool_mask_file(tmp_path: Path):
    array = np.zeros((5, 6), dtype=bool)
    array[2, 3] = True
    Image.fromarray(array).save(tmp_path / "m.png")  # PIL mode "1"
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), array)


def test_non_finite_coordinates_become_invalid(tmp_path: Path):
    xyz = np.full((4, 5, 3), 0.5, dtype=np.float32)
    xyz[0, 0, 2] = np.nan
    xyz[1, 2, 0] = np.inf
    tifffile.imwrite(tmp_path / "c.tiff", xyz, photometric="rgb")
    cloud = read_xyz(tmp_path / "c.tiff")
    assert np.isfinite(cloud).all()
    np.testing.assert_array_equal(cloud[0, 0], 0)
    np.testing.assert_array_equal(cloud[1, 2], 0)
    assert (cloud != 0).all(axis=-1).sum() == 18


def _organised_cloud() -> np.ndarray:
    rng = np.random.default_rng(8)
    xyz = rng.normal(size=(3, 4, 3)).astype(np.float32)
    xyz[1, 2] = 0  # a missing point
    xyz[0, 3] = np.nan  # another, as PCL marks them
    return xyz


def _pcd(xyz: np.ndarray, encoding: str) -> bytes:
    height, width = xyz.shape[:2]
    header = (f"# .PCD v0.7\nVERSION 0.7\nFIELDS x y z rgb\nSIZE 4 4 4 4\nTYPE F F F U\nCOUNT 1 1 1 1\n"
              f"WIDTH {width}\nHEIGHT {height}\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {width * height}\nDATA {encoding}\n")
    points = xyz.reshape(-1, 3)
    if encoding == "ascii":
        body = "".join(f"{x!r} {y!r} {z!r} 4278190080\n" for x, y, z in points.astype(float).tolist())
        return (header + body).encode()
    rows = np.zeros(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4")])
    rows["x"], rows["y"], rows["z"] = points.T
    return header.encode() + rows.tobytes()


def _ply(xyz: np.ndarray, encoding: str, organised: bool = True) -> bytes:
    height, width = xyz.shape[:2]
    info = f"obj_info num_cols {width}\nobj_info num_rows {height}\n" if organised else ""
    header = (f"ply\nformat {encoding} 1.0\ncomment written by the test\n{info}element vertex {width * height}\n"
              "property float x\nproperty float y\nproperty float z\nproperty uchar red\nend_header\n")
    points = xyz.reshape(-1, 3)
    if encoding == "ascii":
        return (header + "".join(f"{x!r} {y!r} {z!r} 7\n" for x, y, z in points.astype(float).tolist())).encode()
    rows = np.zeros(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1")])
    rows["x"], rows["y"], rows["z"] = points.T
    return header.encode() + rows.tobytes()


@pytest.mark.parametrize("kind", ["npy", "pcd ascii", "pcd binary", "ply ascii", "ply binary_little_endian"])
def test_organised_clouds_in_every_format_read_the_same(tmp_path: Path, kind: str):
    """.npy, PCD (HEIGHT > 1) and PLY with PCL's obj_info rows / columns, written here byte by byte, read back as
    the (H, W, 3) cloud, missing points (0, 0, 0), as the MVTec TIFF does."""
    xyz = _organised_cloud()
    expected = np.where(np.isfinite(xyz).all(-1, keepdims=True), xyz, 0)
    suffix, _, encoding = kind.partition(" ")
    path = tmp_path / f"cloud.{suffix}"
    if suffix == "npy":
        np.save(path, xyz)
    else:
        path.write_bytes(_pcd(xyz, encoding) if suffix == "pcd" else _ply(xyz, encoding))
    np.testing.assert_array_equal(read_xyz(path), expected)
    tifffile.imwrite(tmp_path / "cloud.tiff", xyz, photometric="rgb")
    np.testing.assert_array_equal(read_xyz(tmp_path / "cloud.tiff"), read_xyz(path))


def test_unorganised_or_foreign_clouds_are_refused_with_the_reason(tmp_path: Path):
    xyz = _organised_cloud()
    (tmp_path / "flat.ply").write_bytes(_ply(xyz, "ascii", organised=False))
    with pytest.raises(DatasetError, match="flat.ply: a PLY without obj_info"):
        read_xyz(tmp_path / "flat.ply")
    (tmp_path / "flat.pcd").write_bytes(_pcd(xyz.reshape(1, -1, 3), "ascii"))
    with pytest.raises(DatasetError, match="unorganised PCD"):
        read_xyz(tmp_path / "flat.pcd")
    (tmp_path / "cut.pcd").write_bytes(_pcd(xyz, "binary")[:-5])
    with pytest.raises(DatasetError, match="cut.pcd: truncated"):
        read_xyz(tmp_path / "cut.pcd")
    (tmp_path / "c.xyz").write_text("1 2 3\n")
    with pytest.raises(DatasetError, match="not a point cloud file"):
        read_xyz(tmp_path / "c.xyz")


# --- datasets --------------------------------------------------------------------------------------------------------

def test_discovery_pairs_by_stem_and_sorts(synthetic_root: Path, synthetic_config: SyntheticConfig):
    records = discover_samples(synthetic_root, "dome", "test")
    keys = [(r.defect_type, r.stem) for r in records]
    assert keys == sorted(keys)
    assert len(records) == synthetic_config.n_test
    for record in records:
        assert record.rgb_path.stem == record.xyz_path.stem == record.gt_path.stem
        assert record.label == int(record.defect_type != "good")
    assert sum(r.label for r in records) == synthetic_config.n_test - synthetic_config.test_counts()["good"]


def test_pairing_does_not_rely_on_sorted_position(dataset_copy: Path):
    """An extra rgb file that sorts between others must be reported, not silently shift the pairs."""
    rgb_dir = dataset_copy / "dome/train/good/rgb"
    shutil.copy(rgb_dir / "001.png", rgb_dir / "001a.png")
    with pytest.raises(DatasetError, match=r"001a\.png"):
        discover_samples(dataset_copy, "dome", "train")


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_dataset_items(synthetic_root: Path, split: str, synthetic_config: SyntheticConfig):
    dataset = MVTec3DDataset(synthetic_root, "dome", split, img_size=IMG_SIZE)
    for sample in (dataset[0], dataset[len(dataset) - 1]):
        assert sample.rgb.shape == sample.xyz.shape == (3, IMG_SIZE, IMG_SIZE)
        assert sample.gt.shape == (1, IMG_SIZE, IMG_SIZE)
        assert sample.rgb.dtype == sample.xyz.dtype == sample.gt.dtype == torch.float32
        assert sample.original_size == synthetic_config.size
        assert set(sample.gt.unique().tolist()) <= {0.0, 1.0}
        assert bool(sample.gt.any()) == bool(sample.label)
        valid = (sample.xyz != 0).all(dim=0)
        assert 0.5 < valid.float().mean() < 1.0
    assert dataset.labels == [r.label for r in dataset.records]


def test_batches_equal_stacked_samples(synthetic_root: Path):
    dataset = MVTec3DDataset(synthetic_root, "box", "test", img_size=IMG_SIZE)
    batches = list(make_dataloader(dataset, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 2]
    first = batches[0]
    assert first.rgb.shape == (3, 3, IMG_SIZE, IMG_SIZE) and first.label.dtype == torch.int64
    for i in range(3):
        sample = dataset[i]
        torch.testing.assert_close(first.rgb[i], sample.rgb, rtol=0, atol=0)
        torch.testing.assert_close(first.xyz[i], sample.xyz, rtol=0, atol=0)
        torch.testing.assert_close(first.gt[i], sample.gt, rtol=0, atol=0)
        assert first.records[i] == sample.record and first.label[i] == sample.label


def test_shuffling_is_seeded(synthetic_root: Path):
    dataset = MVTec3DDataset(synthetic_root, "dome", "train", img_size=IMG_SIZE)

    def order(seed: int) -> list[str]:
        return [r.name for b in make_dataloader(dataset, batch_size=2, shuffle=True, seed=seed) for r in b.records]

    assert order(115) == order(115)
    assert sorted(order(115)) == sorted(r.name for r in dataset.records)
    assert any(order(s) != order(115) for s in (1, 2, 3))


def test_2d_only_dataset_loads_without_xyz(dataset_copy: Path):
    for xyz_dir in list(dataset_copy.rglob("xyz")):
        shutil.rmtree(xyz_dir)
    dataset = MVTec3DDataset(dataset_copy, "dome", "test", img_size=IMG_SIZE, xyz="optional")
    batch = next(iter(make_dataloader(dataset, batch_size=2)))
    assert batch.xyz is None and batch.rgb.shape == (2, 3, IMG_SIZE, IMG_SIZE)
    assert not dataset.has_xyz
    with pytest.raises(DatasetError, match="--modality rgb"):
        MVTec3DDataset(dataset_copy, "dome", "test", xyz="required")


def test_ignored_xyz_is_not_read(synthetic_root: Path):
    dataset = MVTec3DDataset(synthetic_root, "dome", "train", img_size=IMG_SIZE, xyz="ignored")
    assert dataset[0].xyz is None


def test_good_test_samples_may_lack_gt(dataset_copy: Path):
    shutil.rmtree(dataset_copy / "dome/test/good/gt")
    dataset = MVTec3DDataset(dataset_copy, "dome", "test", img_size=IMG_SIZE)
    good = [i for i, label in enumerate(dataset.labels) if label == 0]
    assert not dataset[good[0]].gt.any()


def test_batch_to_device_moves_every_tensor_and_keeps_metadata(synthetic_root: Path,
                                                              synthetic_config: SyntheticConfig):
    dataset = MVTec3DDataset(synthetic_root, "dome", "test", img_size=IMG_SIZE)
    batch = collate_samples([dataset[0], dataset[1]])
    moved = batch.to("meta")  # a device other than the CPU that every machine has
    assert all(t.device.type == "meta" for t in (moved.rgb, moved.xyz, moved.gt, moved.label))
    assert moved.rgb.shape == batch.rgb.shape and moved.xyz.shape == batch.xyz.shape
    assert len(moved) == 2 and moved.records == batch.records
    assert moved.original_sizes == [synthetic_config.size] * 2


def test_class_resolution(synthetic_root: Path, synthetic_config: SyntheticConfig):
    assert resolve_class_names(synthetic_root, ["all"]) == sorted(synthetic_config.classes)
    with pytest.raises(DatasetError, match="available: box, dome"):
        resolve_class_names(synthetic_root, ["dome", "bagel"])


# --- bad input -------------------------------------------------------------------------------------------------------

def test_missing_dataset_folder(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist.*utils.data.synthetic"):
        discover_samples(tmp_path / "nowhere", "dome", "train")


def test_missing_split_folder(dataset_copy: Path):
    shutil.rmtree(dataset_copy / "dome/validation")
    with pytest.raises(DatasetError, match="validation: split folder missing"):
        discover_samples(dataset_copy, "dome", "validation")


def test_rgb_without_xyz_partner_names_the_file(dataset_copy: Path):
    (dataset_copy / "dome/train/good/xyz/002.tiff").unlink()
    with pytest.raises(DatasetError, match=r"rgb file\(s\) without a xyz partner.*002\.png"):
        MVTec3DDataset(dataset_copy, "dome", "train")


def test_xyz_without_rgb_partner_names_the_file(dataset_copy: Path):
    (dataset_copy / "dome/train/good/rgb/003.png").unlink()
    with pytest.raises(DatasetError, match=r"xyz file\(s\).*without an rgb partner: 003\.tiff"):
        MVTec3DDataset(dataset_copy, "dome", "train")


def test_defect_without_gt_folder(dataset_copy: Path):
    defect_dir = next(p for p in (dataset_copy / "dome/test").iterdir() if p.name != "good")
    shutil.rmtree(defect_dir / "gt")
    with pytest.raises(DatasetError, match="gt/ folder missing"):
        MVTec3DDataset(dataset_copy, "dome", "test")


def test_duplicate_stems(dataset_copy: Path):
    rgb_dir = dataset_copy / "dome/train/good/rgb"
    Image.open(rgb_dir / "000.png").convert("RGB").save(rgb_dir / "000.jpg")
    with pytest.raises(DatasetError, match="two files with stem '000'"):
        MVTec3DDataset(dataset_copy, "dome", "train")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_png(dataset_copy: Path, damage: str):
    path = dataset_copy / "dome/train/good/rgb/001.png"
    data = path.read_bytes()
    path.write_bytes(b"not a png" if damage == "garbage" else data[: len(data) // 2])
    dataset = MVTec3DDataset(dataset_copy, "dome", "train", img_size=IMG_SIZE)
    with pytest.raises(DatasetError, match=r"001\.png: unreadable or truncated image"):
        dataset[1]


@pytest.mark.parametrize("keep", [8, 100, -10])  # 8: only the header (tifffile then returns an empty array)
def test_truncated_tiff(dataset_copy: Path, keep: int):
    path = dataset_copy / "dome/train/good/xyz/001.tiff"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(DatasetError, match=r"001\.tiff: unreadable or truncated tiff"):
        MVTec3DDataset(dataset_copy, "dome", "train", img_size=IMG_SIZE)[1]


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((64, 80), np.float32), r"expected an organized point cloud of shape \(H, W, 3\)"),
        (np.zeros((3, 64, 80), np.float32), "channels first"),  # written as 3 planes of one page
        (np.zeros((64, 80, 3), np.uint16), "expected float32"),
    ],
)
def test_malformed_tiff(dataset_copy: Path, array: np.ndarray, message: str):
    path = dataset_copy / "dome/train/good/xyz/000.tiff"
    tifffile.imwrite(path, array, photometric="minisblack")
    with pytest.raises(DatasetError, match=message):
        MVTec3DDataset(dataset_copy, "dome", "train", img_size=IMG_SIZE)[0]


def test_gt_of_another_size(dataset_copy: Path):
    defect_dir = next(p for p in (dataset_copy / "dome/test").iterdir() if p.name != "good")
    Image.new("L", (10, 10)).save(defect_dir / "gt/000.png")
    dataset = MVTec3DDataset(dataset_copy, "dome", "test", img_size=IMG_SIZE)
    index = next(i for i, r in enumerate(dataset.records) if r.defect_type == defect_dir.name and r.stem == "000")
    with pytest.raises(DatasetError, match="does not match its image"):
        dataset[index]


# --- command line ----------------------------------------------------------------------------------------------------

def test_check_command(synthetic_root: Path, capsys: pytest.CaptureFixture[str]):
    assert main([str(synthetic_root), "--img_size", str(IMG_SIZE), "--batch_size", "3"]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "dome" in out and "box" in out


def test_check_command_reports_bad_file(dataset_copy: Path):
    (dataset_copy / "dome/test/good/rgb/000.png").write_bytes(b"broken")
    assert main([str(dataset_copy), "--img_size", str(IMG_SIZE)]) == 1

