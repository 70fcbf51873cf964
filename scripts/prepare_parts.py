"""A folder of your own parts → the MVTec 3D-AD layout that train.py, calibrate.py and inference.py read
(docs/inspecting.md, "Your own parts, from a folder to the line").

    python scripts/prepare_parts.py --good DIR [--defective DIR] --out D --class_name C
        [--validation_fraction 0.1] [--min_validation 5] [--seed 0] [--keep_background | --plane_cut 0.005]

A parts folder holds an image and an organised cloud per part with the same file stem (``0001.png`` +
``0001.tiff``), side by side or in ``rgb/`` and ``xyz/`` sub-folders; images ``.png`` / ``.jpg``, clouds any format
``predict.py`` reads (MVTec-style float TIFF, or ``.npy`` / ``.pcd`` / ``.ply`` organised H × W × 3). Defective
examples may have masks, ``gt/<stem>.png`` (non-zero = defect).

The good parts are split, seeded, into ``train/good`` and ``validation/good`` (a tenth, at least 5: what
calibrate.py fits the threshold on); defective ones go to ``test/defective`` (with their masks, or without: then
inference.py reports image metrics only). Every cloud is written as an MVTec-style float32 TIFF. By default the
support plane (the table, the fixture's top) and what is not the part are removed with MVTec's background removal
(:mod:`processing.preprocess_mvtec`, the same parameters), and the output is marked as preprocessed; the log says
how many points each part lost. Everything within ``--plane_cut`` of the support plane goes (MVTec's 5 mm: parts
lower than that need a smaller cut, in the clouds' units). ``--keep_background`` keeps the clouds whole (train.py
then warns: real clouds that keep the table detect far worse, docs/inspecting.md). Bad input stops with the file
named: an image without its cloud or the reverse, a cloud of another size than its image, a mask of another size,
masks for some defective parts but not all, too few good parts; nothing is written then.
``D/prepared_parts.json`` records what was done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from tqdm import tqdm

from processing.preprocess_mvtec import BackgroundRemovalConfig, file_rng, remove_background
from utils.data.io import CLOUD_SUFFIXES, DatasetError, atomic_path, read_mask, read_rgb, read_xyz, write_text_atomic
from utils.data.mvtec3d import PARTS_MARKER, PREPROCESSED_MARKER, RGB_SUFFIXES
from utils.data.transforms import centred_offsets
from utils.logs import setup_logging

logger = logging.getLogger("prepare_parts")

VALIDATION_FRACTION = 0.1
MIN_VALIDATION = 5  # good parts held out for calibrate.py at least (its tail fit needs 5)


def find_parts(folder: Path, with_masks: bool = False) -> dict[str, tuple[Path, Path, Path | None]]:
    """Stem → (image, cloud, mask or None) of a parts folder, paired by stem.

    Raises:
        DatasetError: no such folder, no parts, an image without a cloud or a cloud without an image, two files of
            one kind with the same stem.
    """
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder")
    image_dir = folder / "rgb" if (folder / "rgb").is_dir() else folder
    cloud_dir = folder / "xyz" if (folder / "xyz").is_dir() else folder

    def by_stem(directory: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
                if path.stem in found:
                    raise DatasetError(f"{directory}: two files with stem {path.stem!r}: {found[path.stem].name}, "
                                       f"{path.name}")
                found[path.stem] = path
        return found

    images, clouds = by_stem(image_dir, RGB_SUFFIXES), by_stem(cloud_dir, CLOUD_SUFFIXES)
    if not images and not clouds:
        raise DatasetError(f"{folder}: no parts (images {'/'.join(RGB_SUFFIXES)} with clouds "
                           f"{'/'.join(CLOUD_SUFFIXES)} of the same stem, side by side or in rgb/ and xyz/)")
    lonely = [images[s] for s in sorted(set(images) - set(clouds))]
    lonely += [clouds[s] for s in sorted(set(clouds) - set(images))]
    if lonely:
        raise DatasetError(f"{lonely[0]} has no partner (an image and a cloud with the same stem make a part)"
                           + (f"; {len(lonely) - 1} more unpaired file(s)" if len(lonely) > 1 else ""))
    masks = by_stem(folder / "gt", (".png",)) if with_masks and (folder / "gt").is_dir() else {}
    return {stem: (images[stem], clouds[stem], masks.get(stem)) for stem in sorted(images)}


def split_good(stems: list[str], fraction: float, minimum: int, seed: int) -> tuple[list[str], list[str]]:
    """(training stems, validation stems): ``max(minimum, round(fraction · n))`` held out by a seeded shuffle.

    Raises:
        DatasetError: fewer good parts than the validation split plus one for training.
    """
    held = max(minimum, round(fraction * len(stems)))
    if len(stems) < held + 1:
        raise DatasetError(f"{len(stems)} good part(s): at least {held + 1} are needed ({held} held out for "
                           "calibrate.py's validation split, the rest to train on)")
    order = np.random.default_rng(seed).permutation(len(stems))
    validation = sorted(stems[i] for i in order[:held])
    return sorted(set(stems) - set(validation)), validation


def clean_cloud(xyz: np.ndarray, config: BackgroundRemovalConfig, seed: int, name: str) -> tuple[np.ndarray, int]:
    """The cloud with the support plane and everything but the largest cluster removed (MVTec's background
    removal), at its own size (the removal's padding to a square is cut off again); and how many points it lost."""
    cleaned = remove_background(xyz, config, file_rng(seed, Path(name)))
    height, width = xyz.shape[:2]
    top, left = centred_offsets(height, width, cleaned.shape[0])
    cleaned = cleaned[top : top + height, left : left + width]
    removed = int((xyz != 0).any(axis=-1).sum() - (cleaned != 0).any(axis=-1).sum())
    return cleaned, removed


def _write_part(out: Path, image: Path, cloud: np.ndarray, mask: np.ndarray | None) -> None:
    """One part in a defect folder ``out`` (``rgb/``, ``xyz/``, ``gt/``), named by the image's stem."""
    stem = image.stem
    (out / "rgb").mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "rgb" / image.name) as tmp:
        shutil.copyfile(image, tmp)
    with atomic_path(out / "xyz" / f"{stem}.tiff") as tmp:
        tifffile.imwrite(tmp, cloud.astype(np.float32), photometric="rgb")
    if mask is not None:
        with atomic_path(out / "gt" / f"{stem}.png") as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")


def prepare(good: Path, out: Path, class_name: str, defective: Path | None = None,
            fraction: float = VALIDATION_FRACTION, minimum: int = MIN_VALIDATION, seed: int = 0,
            remove: bool = True, config: BackgroundRemovalConfig | None = None) -> dict:
    """Build ``out/class_name`` from the parts folders; returns what was done (also written to
    ``out/prepared_parts.json``).

    Raises:
        DatasetError: bad input (see the module docstring); nothing is written.
    """
    target = out / class_name
    if target.exists() and any(target.iterdir()):
        raise DatasetError(f"{target} exists and is not empty: choose another --out or --class_name")
    parts = {"good": find_parts(good)}
    if defective is not None:
        parts["defective"] = find_parts(defective, with_masks=True)
    train, validation = split_good(list(parts["good"]), fraction, minimum, seed)
    destination = {**{s: ("train", "good") for s in train}, **{s: ("validation", "good") for s in validation}}
    # every file is read and checked before anything is written: bad input leaves no half-built dataset
    checked = []
    for kind, found in parts.items():
        for stem, (image, cloud_path, mask_path) in found.items():
            height, width = read_rgb(image).shape[:2]
            cloud = read_xyz(cloud_path)
            if cloud.shape[:2] != (height, width):
                raise DatasetError(f"{cloud_path}: a cloud of {cloud.shape[1]} × {cloud.shape[0]} points for the "
                                   f"{width} × {height} image {image.name}: image and cloud must be pixel-aligned")
            if not (cloud != 0).any(axis=-1).any():
                raise DatasetError(f"{cloud_path}: the cloud has no valid point")
            mask = read_mask(mask_path) if mask_path is not None else None
            if mask is not None and mask.shape != (height, width):
                raise DatasetError(f"{mask_path}: a mask of {mask.shape[1]} × {mask.shape[0]} for the {width} × "
                                   f"{height} image {image.name}")
            split, defect = destination[stem] if kind == "good" else ("test", "defective")
            checked.append((kind, stem, image, cloud, mask, split, defect))
    masked = [c for c in checked if c[0] == "defective" and c[4] is not None]
    unmasked = [c for c in checked if c[0] == "defective" and c[4] is None]
    if masked and unmasked:
        raise DatasetError(f"{unmasked[0][2]}: no mask in {defective / 'gt'} while {len(masked)} other defective "
                           "part(s) have one: give every defective part a mask, or none")
    config = config or BackgroundRemovalConfig()
    removed = {}
    for kind, stem, image, cloud, mask, split, defect in tqdm(checked, desc="parts", unit="part"):
        if remove:
            try:
                cloud, removed[f"{kind}/{stem}"] = clean_cloud(cloud, config, seed, f"{kind}/{stem}")
            except ValueError as err:
                raise DatasetError(f"{image.parent}/{stem}: background removal failed ({err}); check the part, or "
                                   "keep the background with --keep_background") from None
            logger.info("%s/%s: removed %d of %d points (support plane and clutter)", kind, stem,
                        removed[f"{kind}/{stem}"], int((cloud != 0).any(-1).sum()) + removed[f"{kind}/{stem}"])
        _write_part(target / split / defect, image, cloud, mask)
    with_masks = sum(1 for c in checked if c[0] == "defective" and c[4] is not None)
    record = {
        "tool": "scripts/prepare_parts.py", "class_name": class_name,
        "sources": {kind: str(path.resolve()) for kind, path in (("good", good), ("defective", defective)) if path},
        "train": len(train), "validation": len(validation), "validation_stems": validation,
        "defective": len(parts.get("defective", {})), "defective_with_masks": with_masks, "seed": seed,
        "background_removed": remove, "points_removed": removed,
    }
    marker = out / PARTS_MARKER
    previous = json.loads(marker.read_text()) if marker.is_file() else {}
    write_text_atomic(marker, json.dumps({**previous, class_name: record}, indent=2) + "\n")
    if remove:  # the same tool and parameters as for MVTec 3D-AD: train.py need not warn about raw clouds
        marker = {"tool": "scripts/prepare_parts.py (processing/preprocess_mvtec.py's background removal)",
                  "parameters": {**dataclasses.asdict(config), "seed": seed, "cropped_back_to_the_image": True}}
        write_text_atomic(out / PREPROCESSED_MARKER, json.dumps(marker, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--good", type=Path, required=True, help="folder of good parts")
    parser.add_argument("--defective", type=Path, help="folder of defective parts (with gt/ masks or without)")
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write (the MVTec 3D-AD layout)")
    parser.add_argument("--class_name", required=True)
    parser.add_argument("--validation_fraction", type=float, default=VALIDATION_FRACTION,
                        help="share of the good parts held out for calibrate.py (default 0.1)")
    parser.add_argument("--min_validation", type=int, default=MIN_VALIDATION,
                        help="held out at least this many (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="which good parts are held out")
    background = parser.add_mutually_exclusive_group()
    background.add_argument("--keep_background", action="store_true",
                            help="do not remove the support plane and clutter from the clouds")
    background.add_argument("--plane_cut", type=float, default=BackgroundRemovalConfig.plane_cut,
                            help="points nearer than this to the support plane are removed, in the clouds' units "
                                 "(default: MVTec's 0.005 m)")
    args = parser.parse_args(argv)
    if not 0 <= args.validation_fraction < 1 or args.min_validation < 1:
        parser.error("--validation_fraction must be in [0, 1) and --min_validation at least 1")
    setup_logging()
    try:
        record = prepare(args.good, args.out, args.class_name, args.defective, args.validation_fraction,
                         args.min_validation, args.seed, not args.keep_background,
                         dataclasses.replace(BackgroundRemovalConfig(), plane_cut=args.plane_cut))
    except DatasetError as err:
        logger.error("%s", err)
        return 1
    logger.info("%s: %d training, %d validation and %d defective parts in %s (next: python train.py --dataset_path "
                "%s --class_name %s --preset lite ...)", args.class_name, record["train"], record["validation"],
                record["defective"], args.out / args.class_name, args.out, args.class_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
