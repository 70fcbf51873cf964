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


# Organised point clouds (H × W × 3): MVTec 3D-AD's float TIFF; numpy arrays; PCD with HEIGHT > 1 (PCL's organised
# clouds); PLY with PCL's ``obj_info num_cols / num_rows`` (an organised cloud written by PCL). Missing points are
# (0, 0, 0) or non-finite.
CLOUD_SUFFIXES = (".tiff", ".tif", ".npy", ".pcd", ".ply")


def read_xyz(path: str | Path) -> np.ndarray:
    """Read an organized point cloud (H, W, 3) in the sensor's units (MVTec 3D-AD: metres) from any of
    :data:`CLOUD_SUFFIXES`.

    Pixels with a non-finite coordinate (NaN or inf) are invalid and set to (0, 0, 0),
    the dataset's marker for "no measurement".

    Returns:
        float32 array of shape (H, W, 3).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CLOUD_SUFFIXES:
        raise DatasetError(f"{path}: not a point cloud file (expected one of {', '.join(CLOUD_SUFFIXES)})")
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    readers = {".npy": _read_npy, ".pcd": _read_pcd, ".ply": _read_ply}
    array = readers.get(suffix, _read_tiff)(path)
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


def _read_tiff(path: Path) -> np.ndarray:
    try:
        array = tifffile.imread(path)
    except Exception as err:  # tifffile raises a variety of types for corrupt files
        raise DatasetError(f"{path}: unreadable or truncated tiff ({type(err).__name__}: {err})") from None
    if array.size == 0:  # e.g. a file cut right after its 8-byte header: tifffile finds no page and returns (0,)
        raise DatasetError(f"{path}: unreadable or truncated tiff (no image data)")
    return array


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:  # a truncated or pickled file
        raise DatasetError(f"{path}: unreadable .npy ({type(err).__name__}: {err})") from None


def _header(path: Path, data: bytes, end_marker: bytes, what: str) -> tuple[list[list[str]], int]:
    """The header's lines (split into words) up to and including ``end_marker``'s line, and where the data starts."""
    end = data.find(end_marker)
    if end < 0:
        raise DatasetError(f"{path}: not a {what} file (no '{end_marker.decode().strip()}' line)")
    start = data.index(b"\n", end) + 1
    return [line.split() for line in data[:start].decode("ascii", "replace").splitlines() if line.strip()], start


def _read_pcd(path: Path) -> np.ndarray:
    """PCD (ascii or binary) with fields x, y, z among others and HEIGHT > 1 (organised)."""
    data = path.read_bytes()
    lines, start = _header(path, data, b"DATA ", "PCD")
    header = {words[0].upper(): words[1:] for words in lines if not words[0].startswith("#")}
    try:
        fields, sizes, types = header["FIELDS"], [int(v) for v in header["SIZE"]], header["TYPE"]
        counts = [int(v) for v in header.get("COUNT", ["1"] * len(fields))]
        width, height, encoding = int(header["WIDTH"][0]), int(header["HEIGHT"][0]), header["DATA"][0]
    except (KeyError, ValueError, IndexError) as err:
        raise DatasetError(f"{path}: malformed PCD header ({err})") from None
    if height <= 1:
        raise DatasetError(f"{path}: an unorganised PCD cloud (HEIGHT {height}); the detectors need the organised "
                           "H × W layout of the sensor (save it with its WIDTH and HEIGHT)")
    if not {"x", "y", "z"} <= set(fields):
        raise DatasetError(f"{path}: PCD without x, y, z fields ({' '.join(fields)})")
    kinds = {("F", 4): "<f4", ("F", 8): "<f8", ("U", 1): "u1", ("U", 2): "<u2", ("U", 4): "<u4", ("I", 1): "i1",
             ("I", 2): "<i2", ("I", 4): "<i4"}
    dtype = np.dtype([(f"{name}_{k}", kinds[(kind, size)]) for name, kind, size, count in
                      zip(fields, types, sizes, counts) for k in range(count)])
    if encoding == "ascii":
        values = np.loadtxt(io.StringIO(data[start:].decode("ascii")), dtype=np.float64, ndmin=2)
        columns = {name: values[:, i] for i, name in enumerate(dtype.names)}
    elif encoding == "binary":
        if len(data) - start < dtype.itemsize * width * height:
            raise DatasetError(f"{path}: truncated PCD data ({len(data) - start} bytes for {width} × {height} points)")
        columns = np.frombuffer(data, dtype=dtype, count=width * height, offset=start)
    else:
        raise DatasetError(f"{path}: PCD DATA {encoding} is not supported: save it as ascii or binary")
    if len(columns["x_0"]) != width * height:
        raise DatasetError(f"{path}: {len(columns['x_0'])} points for WIDTH {width} × HEIGHT {height}")
    return np.stack([np.asarray(columns[f"{a}_0"], dtype=np.float64) for a in "xyz"], -1).reshape(height, width, 3)


def _read_ply(path: Path) -> np.ndarray:
    """PLY (ascii or binary little-endian) whose vertices are an organised cloud: PCL writes ``obj_info num_cols W``
    and ``obj_info num_rows H`` for one."""
    data = path.read_bytes()
    lines, start = _header(path, data, b"end_header", "PLY")
    info = {words[1]: words[2] for words in lines if words[0] == "obj_info" and len(words) > 2}
    if "num_cols" not in info or "num_rows" not in info:
        raise DatasetError(f"{path}: a PLY without obj_info num_cols / num_rows is an unorganised cloud; the "
                           "detectors need the sensor's H × W layout (save it organised, e.g. as .npy or .pcd)")
    width, height = int(info["num_cols"]), int(info["num_rows"])
    encoding = next((words[1] for words in lines if words[0] == "format"), "")
    kinds = {"float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8", "uchar": "u1", "uint8": "u1",
             "char": "i1", "int8": "i1", "ushort": "<u2", "uint16": "<u2", "short": "<i2", "int16": "<i2",
             "uint": "<u4", "uint32": "<u4", "int": "<i4", "int32": "<i4"}
    properties, in_vertex = [], False
    for words in lines:
        if words[0] == "element":
            in_vertex = words[1] == "vertex"
        elif words[0] == "property" and in_vertex:
            if words[1] == "list" or words[1] not in kinds:
                raise DatasetError(f"{path}: vertex property {' '.join(words[1:])} is not supported")
            properties.append((words[2], kinds[words[1]]))
    dtype = np.dtype(properties)
    count = width * height
    if encoding == "ascii":
        values = np.loadtxt(io.StringIO(data[start:].decode("ascii")), dtype=np.float64, ndmin=2, max_rows=count)
        columns = {name: values[:, i] for i, name in enumerate(dtype.names)}
    elif encoding == "binary_little_endian":
        if len(data) - start < dtype.itemsize * count:
            raise DatasetError(f"{path}: truncated PLY data ({len(data) - start} bytes for {width} × {height} points)")
        columns = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    else:
        raise DatasetError(f"{path}: PLY format {encoding} is not supported: save it as ascii or "
                           "binary_little_endian")
    if not {"x", "y", "z"} <= set(dtype.names) or len(columns["x"]) != count:
        raise DatasetError(f"{path}: expected x, y, z for {width} × {height} vertices")
    return np.stack([np.asarray(columns[a], dtype=np.float64) for a in "xyz"], -1).reshape(height, width, 3)



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
