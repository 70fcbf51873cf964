"""Loading datasets in the MVTec 3D-AD layout (docs/data.md, "Data layout and loading").

Layout::

    <root>/<class>/train/good/{rgb/NNN.png, xyz/NNN.tiff}
    <root>/<class>/validation/good/{rgb, xyz}
    <root>/<class>/test/<defect type or good>/{rgb/NNN.png, xyz/NNN.tiff, gt/NNN.png}

Files are paired by stem, never by sorted position, and samples are ordered by
(defect type, stem) so that every run sees them in the same order. For 2D-only datasets
(rgb + gt, like MVTec AD converted to this layout) the ``xyz`` folders may be absent.

Run ``python -m utils.data.mvtec3d DATA_DIR`` to read every sample of a dataset once and print a
summary; it stops at the first bad file with a message naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.data.io import CLOUD_SUFFIXES, DatasetError, read_mask, read_rgb, read_xyz
from utils.data.synthetic import MARKER_FILE as SYNTHETIC_MARKER
from utils.data.transforms import IMAGENET, Normalization, mask_to_tensor, rgb_to_tensor, xyz_to_tensor
from utils.logs import setup_logging

logger = logging.getLogger(__name__)

MVTEC3D_CLASSES = (
    "bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire",
)
SPLITS = ("train", "validation", "test")
GOOD = "good"
RGB_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
XYZ_SUFFIXES = CLOUD_SUFFIXES  # every organised-cloud format read_xyz reads
GT_SUFFIXES = (".png",)
PREPROCESSED_MARKER = "preprocessed.json"
# written by scripts/prepare_parts.py: a user's own parts, whose defective examples may come without masks
PARTS_MARKER = "prepared_parts.json"
"""Written by processing/preprocess_mvtec.py into a background-removed dataset."""

XyzPolicy = Literal["required", "optional", "ignored"]
"""How xyz files are treated: ``required`` (every rgb needs a partner), ``optional`` (used when
the split has xyz folders, else absent: 2D-only datasets) or ``ignored`` (never read)."""


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample lives on disk."""

    class_name: str
    split: str
    defect_type: str
    stem: str
    rgb_path: Path
    xyz_path: Path | None = None
    gt_path: Path | None = None

    @property
    def label(self) -> int:
        """0 for good samples, 1 for every defect type."""
        return int(self.defect_type != GOOD)

    @property
    def name(self) -> str:
        """``<defect type>/<stem>``: unique within a class and split."""
        return f"{self.defect_type}/{self.stem}"


@dataclass
class Sample:
    """One transformed sample.

    Attributes:
        rgb: (3, S, S) ImageNet-normalised image.
        xyz: (3, S, S) organized point cloud in metres, invalid pixels (0, 0, 0); None without xyz.
        gt: (1, S, S) ground-truth mask of 0/1 (all zero for good and training samples).
        label: 0 good, 1 anomalous.
        record: the files the sample was read from.
        original_size: (H, W) of the rgb file, for evaluation at native resolution.
    """

    rgb: torch.Tensor
    xyz: torch.Tensor | None
    gt: torch.Tensor
    label: int
    record: SampleRecord
    original_size: tuple[int, int]


@dataclass
class Batch:
    """A batch of samples: the tensors of :class:`Sample` stacked along a leading B axis.

    Attributes:
        rgb: (B, 3, S, S).
        xyz: (B, 3, S, S) or None.
        gt: (B, 1, S, S).
        label: (B,) int64.
        records: B sample records.
        original_sizes: B (H, W) tuples.
    """

    rgb: torch.Tensor
    xyz: torch.Tensor | None
    gt: torch.Tensor
    label: torch.Tensor
    records: list[SampleRecord] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def to(self, device: torch.device | str) -> Batch:
        """The batch with its tensors on ``device``."""
        return Batch(
            rgb=self.rgb.to(device),
            xyz=None if self.xyz is None else self.xyz.to(device),
            gt=self.gt.to(device),
            label=self.label.to(device),
            records=self.records,
            original_sizes=self.original_sizes,
        )


def is_background_removed(root: str | Path) -> bool:
    """Whether the clouds under ``root`` had their background removed (preprocessing marker, or synthetic data
    generated with ``--background none``)."""
    root = Path(root)
    if (root / PREPROCESSED_MARKER).is_file():
        return True
    synthetic = root / SYNTHETIC_MARKER
    if synthetic.is_file():
        classes = json.loads(synthetic.read_text()).get("classes", {})
        return bool(classes) and all(c.get("background") == "none" for c in classes.values())
    return False


def find_class_names(root: str | Path) -> list[str]:
    """The classes present under ``root``: sub-folders holding a ``train`` or ``test`` folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {root} does not exist; generate synthetic data with "
            f"`python -m utils.data.synthetic {root}` or download MVTec 3D-AD (see README)"
        )
    return sorted(p.name for p in root.iterdir() if (p / "train").is_dir() or (p / "test").is_dir())


def resolve_class_names(root: str | Path, requested: Sequence[str]) -> list[str]:
    """Expand ``all`` to the classes present under ``root`` and check that each requested one exists."""
    available = find_class_names(root)
    if not available:
        raise DatasetError(f"{root}: no class folders with train/ or test/ inside")
    if list(requested) == ["all"]:
        return available
    missing = [name for name in requested if name not in available]
    if missing:
        raise DatasetError(f"{root}: class(es) {', '.join(missing)} not found; available: {', '.join(available)}")
    return list(requested)


def _files_by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in suffixes or path.name.startswith("."):
            continue
        if path.stem in files:
            raise DatasetError(f"{folder}: two files with stem '{path.stem}': {files[path.stem].name}, {path.name}")
        files[path.stem] = path
    return files


def _pair(rgb: dict[str, Path], other: dict[str, Path], folder: Path, kind: str) -> None:
    """Fail with the unpaired file names when ``rgb`` and ``other`` do not hold the same stems."""
    without_partner = sorted(set(rgb) - set(other))
    orphans = sorted(set(other) - set(rgb))
    problems = []
    if without_partner:
        shown = ", ".join(rgb[s].name for s in without_partner[:5])
        problems.append(f"{len(without_partner)} rgb file(s) without a {kind} partner in {folder}: {shown}")
    if orphans:
        shown = ", ".join(other[s].name for s in orphans[:5])
        problems.append(f"{len(orphans)} {kind} file(s) in {folder} without an rgb partner: {shown}")
    if problems:
        raise DatasetError("; ".join(problems) + " (files are paired by stem, e.g. rgb/000.png ~ xyz/000.tiff)")


def discover_samples(
    root: str | Path, class_name: str, split: str, xyz: XyzPolicy = "required"
) -> list[SampleRecord]:
    """List the samples of one class and split, paired by stem and sorted by (defect type, stem).

    Raises:
        DatasetError: missing folders, unpaired files, or a split without samples.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if xyz not in ("required", "optional", "ignored"):
        raise ValueError(f"xyz must be 'required', 'optional' or 'ignored', got {xyz!r}")
    class_dir = Path(root) / class_name
    if not class_dir.is_dir():
        resolve_class_names(root, [class_name])  # raises with the list of available classes
    split_dir = class_dir / split
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: split folder missing (expected {'/'.join(SPLITS)} under {class_dir})")
    defect_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not defect_dirs:
        raise DatasetError(f"{split_dir}: no defect-type folders (expected at least {split_dir / GOOD})")

    with_xyz = {d.name: (d / "xyz").is_dir() for d in defect_dirs}
    if xyz == "optional" and len(set(with_xyz.values())) > 1:
        lacking = [name for name, has in with_xyz.items() if not has]
        raise DatasetError(f"{split_dir}: some defect folders have xyz/ and others ({', '.join(lacking)}) do not")

    records: list[SampleRecord] = []
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        if not (defect_dir / "rgb").is_dir():
            raise DatasetError(f"{defect_dir}: rgb/ folder missing")
        rgb = _files_by_stem(defect_dir / "rgb", RGB_SUFFIXES)
        xyz_files: dict[str, Path] = {}
        if xyz == "required" or (xyz == "optional" and with_xyz[defect]):
            if not with_xyz[defect]:
                raise DatasetError(
                    f"{defect_dir}: xyz/ folder missing (point clouds are needed for this modality; "
                    "use --modality rgb for a 2D-only dataset)"
                )
            xyz_files = _files_by_stem(defect_dir / "xyz", XYZ_SUFFIXES)
            _pair(rgb, xyz_files, defect_dir / "xyz", "xyz")
        gt_files: dict[str, Path] = {}
        if split == "test" and ((defect_dir / "gt").is_dir() or defect != GOOD):
            if not (defect_dir / "gt").is_dir():
                if not (Path(root) / PARTS_MARKER).is_file():
                    raise DatasetError(f"{defect_dir}: gt/ folder missing (test defects need ground-truth masks)")
                logger.warning("%s: no ground-truth masks: the pixel metrics (P-AUROC, AUPRO) are undefined for "
                               "this class, the image metrics are not", defect_dir)
            else:
                gt_files = _files_by_stem(defect_dir / "gt", GT_SUFFIXES)
                _pair(rgb, gt_files, defect_dir / "gt", "gt")
        records += [
            SampleRecord(class_name, split, defect, stem, path, xyz_files.get(stem), gt_files.get(stem))
            for stem, path in sorted(rgb.items())
        ]
    if not records:
        raise DatasetError(f"{split_dir}: no samples (no {'/'.join(RGB_SUFFIXES)} files under */rgb/)")
    return records


class MVTec3DDataset(Dataset):
    """One class and split of an MVTec 3D-AD style dataset.

    Args:
        root: dataset root (holding one folder per class).
        class_name: class folder name.
        split: ``train``, ``validation`` or ``test``.
        img_size: side S of the square network input (224 for the paper).
        xyz: how point clouds are treated, see :data:`XyzPolicy`.
        normalization: the RGB backbone's input mean/std (``ExtractorConfig.normalization``).
    """

    def __init__(
        self, root: str | Path, class_name: str, split: str, img_size: int = 224, xyz: XyzPolicy = "required",
        normalization: Normalization = IMAGENET,
    ) -> None:
        self.root = Path(root)
        self.class_name = class_name
        self.split = split
        self.img_size = img_size
        self.normalization = normalization
        self.records = discover_samples(root, class_name, split, xyz)

    @property
    def labels(self) -> list[int]:
        """Per-sample labels, known without reading any file."""
        return [record.label for record in self.records]

    @property
    def has_xyz(self) -> bool:
        """Whether samples carry a point cloud."""
        return self.records[0].xyz_path is not None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        rgb = read_rgb(record.rgb_path)
        height, width = rgb.shape[:2]
        xyz = None
        if record.xyz_path is not None:
            xyz = xyz_to_tensor(read_xyz(record.xyz_path), self.img_size)
        if record.gt_path is not None:
            mask = read_mask(record.gt_path)
            if mask.shape != (height, width):
                raise DatasetError(
                    f"{record.gt_path}: mask of size {mask.shape} does not match its image {record.rgb_path} "
                    f"of size {(height, width)}"
                )
            gt = mask_to_tensor(mask, self.img_size)
        else:
            gt = torch.zeros(1, self.img_size, self.img_size)
        return Sample(
            rgb=rgb_to_tensor(rgb, self.img_size, self.normalization),
            xyz=xyz,
            gt=gt,
            label=record.label,
            record=record,
            original_size=(height, width),
        )


def collate_samples(samples: Sequence[Sample]) -> Batch:
    """Stack samples into a :class:`Batch` (the ``collate_fn`` of :func:`make_dataloader`)."""
    has_xyz = {sample.xyz is not None for sample in samples}
    if len(has_xyz) > 1:
        raise DatasetError("cannot batch samples with and without point clouds together")
    return Batch(
        rgb=torch.stack([s.rgb for s in samples]),
        xyz=torch.stack([s.xyz for s in samples]) if has_xyz == {True} else None,
        gt=torch.stack([s.gt for s in samples]),
        label=torch.tensor([s.label for s in samples], dtype=torch.int64),
        records=[s.record for s in samples],
        original_sizes=[s.original_size for s in samples],
    )


def make_dataloader(
    dataset: MVTec3DDataset, batch_size: int = 1, shuffle: bool = False, seed: int = 0, num_workers: int = 0
) -> DataLoader:
    """A DataLoader yielding :class:`Batch` objects; shuffling is driven by its own seeded generator."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
        num_workers=num_workers, collate_fn=collate_samples,
    )


def _summarise(dataset: MVTec3DDataset, batch_size: int) -> dict[str, object]:
    """Read every sample once through a DataLoader and collect what a user wants to see."""
    valid_fractions: list[float] = []
    sizes: Counter[tuple[int, int]] = Counter()
    shapes = ""
    for batch in tqdm(make_dataloader(dataset, batch_size), desc=f"{dataset.class_name}/{dataset.split}", leave=False):
        sizes.update(batch.original_sizes)
        if batch.xyz is not None:
            valid = (batch.xyz != 0).all(dim=1)
            valid_fractions += valid.flatten(1).float().mean(dim=1).tolist()
        if not shapes:
            xyz_shape = "-" if batch.xyz is None else tuple(batch.xyz.shape)
            shapes = f"rgb {tuple(batch.rgb.shape)} xyz {xyz_shape} gt {tuple(batch.gt.shape)}"
    defects = Counter(record.defect_type for record in dataset.records)
    return {
        "class": dataset.class_name,
        "split": dataset.split,
        "samples": len(dataset),
        "anomalous": sum(dataset.labels),
        "defect types": ", ".join(f"{name}:{count}" for name, count in sorted(defects.items())),
        "native sizes (HxW)": ", ".join(f"{h}x{w}" for h, w in sorted(sizes)),
        "valid px": f"{100 * np.mean(valid_fractions):.1f}%" if valid_fractions else "-",
        "first batch": shapes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.data.mvtec3d",
        description="Read every sample of an MVTec 3D-AD style dataset once and print a summary.",
    )
    parser.add_argument("dataset_path", type=Path)
    parser.add_argument("--class_names", nargs="+", default=["all"])
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--xyz", choices=("required", "optional", "ignored"), default="optional")
    args = parser.parse_args(argv)
    setup_logging()

    try:
        rows = []
        for class_name in resolve_class_names(args.dataset_path, args.class_names):
            for split in args.splits:
                if not (args.dataset_path / class_name / split).is_dir() and split == "validation":
                    logger.warning("%s/%s: no validation split", class_name, split)
                    continue
                dataset = MVTec3DDataset(args.dataset_path, class_name, split, args.img_size, args.xyz)
                rows.append(_summarise(dataset, args.batch_size))
    except DatasetError as err:
        logger.error("%s", err)
        return 1
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)))
    print(f"OK: {sum(int(r['samples']) for r in rows)} samples of {args.dataset_path} read without error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
