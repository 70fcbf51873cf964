"""Copy the RGB images and ground-truth masks of one MVTec 3D-AD class into a 2D-only dataset (no point clouds).

    python scripts/prepare_2d_class.py CLASS_DIR --out DATA_ROOT

CLASS_DIR is a class folder in the MVTec 3D-AD layout (``<split>/<defect>/{rgb,xyz,gt}``), e.g. ``rope`` of a
checkout of https://github.com/nextgencodes/datasets at commit 8e2e79197933b28db9942d38c640ef7deb9df244, a copy
whose ``xyz`` files are missing or placeholders. Every ``rgb/*.png`` and ``gt/*.png`` goes to
``DATA_ROOT/<class>/<split>/<defect>/`` unchanged; ``xyz`` is left out, so the class is read with
``--modality rgb`` (docs/real_data.md has the recipe and the numbers measured on rope). Files that are not PNG
images (a Git LFS pointer, an empty file) are an error naming them. An existing non-empty ``DATA_ROOT/<class>`` is
refused. The data stays under its own licence (MVTec 3D-AD: CC BY-NC-SA 4.0): never commit it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

logger = logging.getLogger("prepare_2d_class")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPLITS = ("train", "validation", "test")


def copy_class(class_dir: Path, out_root: Path) -> dict[str, int]:
    """Copy ``class_dir``'s rgb and gt PNGs under ``out_root/<class>``; returns the number of images per split.

    Raises:
        ValueError: no split folder, a file that is not a PNG, or a non-empty destination.
    """
    target = out_root / class_dir.name
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"{target} exists and is not empty: choose another --out")
    sources = sorted(p for split in SPLITS for p in (class_dir / split).glob("*/*/*.png")
                     if p.parent.name in ("rgb", "gt"))
    if not sources:
        raise ValueError(f"{class_dir}: no <split>/<defect>/rgb/*.png files (is it an MVTec 3D-AD class folder?)")
    broken = [str(p) for p in sources if p.read_bytes()[:8] != PNG_SIGNATURE]
    if broken:
        raise ValueError(f"{len(broken)} files are not PNG images (Git LFS pointers?), e.g. {broken[0]}: fetch "
                         "the real files first (git lfs pull)")
    counts: dict[str, int] = {}
    for source in sources:
        relative = source.relative_to(class_dir)
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
        if relative.parts[2] == "rgb":
            counts[relative.parts[0]] = counts.get(relative.parts[0], 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("class_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        counts = copy_class(args.class_dir, args.out)
    except ValueError as err:
        logger.error("%s", err)
        return 1
    logger.info("%s: %s images copied to %s (check with `python -m utils.data.mvtec3d %s --class_names %s --xyz "
                "optional`)", args.class_dir.name, ", ".join(f"{k} {v}" for k, v in counts.items()), args.out,
                args.out, args.class_dir.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
