"""File input and output: dataset readers with errors that name the file, and atomic writes.

Every reader returns plain numpy arrays at the file's native resolution; resizing and
normalisation live in :mod:`utils.data.transforms`.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image, UnidentifiedImageError

from networks.errors import InputError  # noqa: F401 - the data errors below derive from it; re-exported

logger = logging.getLogger(__name__)


class DatasetError(InputError, ValueError):
    """A dataset file or folder is missing, unpaired, unreadable or malformed."""


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode an image so that truncated files fail here, not later."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable or truncated image ({err})") from None
    return image


def read_rgb(path: str | Path) -> np.ndarray:
    """Read a colour image.

    Greyscale, palette and RGBA images are converted to RGB.

    Returns:
        uint8 array of shape (H, W, 3).
    """
    return np.asarray(_open_image(Path(path)).convert("RGB"), dtype=np.uint8).copy()


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask; every non-zero value is anomalous (0/255, 0/1 and bool all work).

    Returns:
        bool array of shape (H, W).
    """
    path = Path(path)
    image = _open_image(path)
    array = np.asarray(image)
    if array.ndim == 3:  # RGB(A) masks: anomalous where any colour channel is non-zero
        array = array[..., :3].max(axis=-1) if array.shape[-1] >= 3 else array[..., 0]
    if array.ndim != 2:
        raise DatasetError(f"{path}: expected a 2-D mask, got an image of shape {array.shape}")
    return array > 0


def read_xyz(path: str | Path) -> np.ndarray:
    """Read an organized point cloud stored as a (H, W, 3) floating-point tiff in metres.

    Pixels with a non-finite coordinate (NaN or inf) are invalid and set to (0, 0, 0),
    the dataset's marker for "no measurement".

    Returns:
        float32 array of shape (H, W, 3).
    """
    path = Path(path)
    try:
        array = tifffile.imread(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except Exception as err:  # tifffile raises a variety of types for corrupt files
        raise DatasetError(f"{path}: unreadable or truncated tiff ({type(err).__name__}: {err})") from None
    if array.size == 0:  # e.g. a file cut right after its 8-byte header: tifffile finds no page and returns (0,)
        raise DatasetError(f"{path}: unreadable or truncated tiff (no image data)")
    if array.ndim != 3 or array.shape[-1] != 3:
        hint = " (channels first? expected channels last)" if array.ndim == 3 and array.shape[0] == 3 else ""
        raise DatasetError(
            f"{path}: expected an organized point cloud of shape (H, W, 3), got {array.shape}{hint}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise DatasetError(
            f"{path}: expected float32 xyz coordinates in metres, got dtype {array.dtype} "
            "(a depth image or an integer-encoded cloud is not an MVTec 3D-AD xyz file)"
        )
    array = array.astype(np.float32, copy=True)
    non_finite = ~np.isfinite(array).all(axis=-1)
    if non_finite.any():
        logger.debug("%s: %d pixels with NaN/inf coordinates treated as invalid", path, int(non_finite.sum()))
        array[non_finite] = 0.0
    return array



class WriteError(InputError, OSError):
    """A file could not be written (a full disk, a read-only folder): names the file and the fix; whatever the
    file held before is unchanged (every write goes through :func:`atomic_path` or appends whole lines)."""

    def __init__(self, path: str | Path, error: BaseException) -> None:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        super().__init__(f"could not write {path} ({reason}): free space on its device, make its folder writable, or "
                         f"write somewhere else; the previous {Path(path).name}, if there was one, is unchanged")


def _plain_file_mode() -> int:
    """The permissions of a file created by ``open(path, "w")`` under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    Readers never see a half-written file, and a failure leaves an existing ``path`` untouched::

        with atomic_path("metrics.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, _plain_file_mode())  # mkstemp makes 0600 files; give what open(path, "w") would
        os.close(fd)
    except OSError as err:
        raise WriteError(path, err) from err
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as err:  # the write inside the block, or the rename
        raise WriteError(path, err) from err
    finally:
        tmp.unlink(missing_ok=True)


def save_torch_atomic(path: str | Path, obj: object) -> None:
    """``torch.save(obj)`` to ``path`` atomically. Serialised in memory first: torch's writer reports a full disk as a
    RuntimeError without the path, a plain write as an OSError, which :func:`atomic_path` names
    (:class:`WriteError`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
