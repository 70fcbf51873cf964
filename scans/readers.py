"""Point-cloud file readers: .ply (ascii, binary little endian), .pcd (ascii, binary), .xyz/.txt/.csv, .npy.

Every reader returns the points in file order as an (N, 3) float64 array of x, y, z; extra columns/fields are
ignored. Malformed files raise :class:`ScanFormatError` naming the file and the problem.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from utils.data.io import InputError

SUPPORTED_SUFFIXES = (".ply", ".pcd", ".xyz", ".txt", ".csv", ".npy")


class ScanFormatError(InputError, ValueError):
    """A scan file is malformed or of an unsupported kind."""


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def _xyz_columns(names: list[str], path: Path) -> list[int]:
    try:
        return [names.index(axis) for axis in ("x", "y", "z")]
    except ValueError:
        raise ScanFormatError(f"{path}: no x, y and z fields (found {', '.join(names)})") from None


def _finish(points: np.ndarray, path: Path) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ScanFormatError(f"{path}: expected N x 3 points, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ScanFormatError(f"{path}: contains NaN or infinite coordinates")
    return points


def _ascii_rows(body: bytes, count: int, path: Path, what: str) -> np.ndarray:
    """The first ``count`` non-empty lines of an ascii body as a float array."""
    lines = [line for line in body.decode("ascii", errors="replace").splitlines() if line.strip()][:count]
    if len(lines) < count:
        raise ScanFormatError(f"{path}: {len(lines)} {what} lines, header says {count}")
    try:
        rows = [[float(v) for v in line.split()] for line in lines]
    except ValueError as err:
        raise ScanFormatError(f"{path}: bad {what} line ({err})") from None
    if len({len(row) for row in rows}) > 1:
        raise ScanFormatError(f"{path}: {what} lines with different numbers of values")
    return np.array(rows)


def _binary_xyz(data: bytes, offset: int, dtype: np.dtype, count: int, path: Path) -> np.ndarray:
    """x, y, z of ``count`` little-endian records of ``dtype`` starting at ``offset``."""
    if len(data) - offset < count * dtype.itemsize:
        raise ScanFormatError(f"{path}: truncated (header says {count} points)")
    records = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return _finish(np.stack([records[axis] for axis in ("x", "y", "z")], axis=1), path)


def _read_header(data: bytes, end_marker: bytes, path: Path) -> tuple[list[str], int]:
    index = data.find(end_marker)
    if index < 0:
        raise ScanFormatError(f"{path}: header has no '{end_marker.decode().strip()}' line")
    end = data.index(b"\n", index) + 1
    return data[:end].decode("ascii", errors="replace").splitlines(), end


def read_ply(path: Path) -> np.ndarray:
    data = path.read_bytes()
    if not data.startswith(b"ply"):
        raise ScanFormatError(f"{path}: not a PLY file (no 'ply' magic)")
    header, body_start = _read_header(data, b"end_header", path)
    fmt, vertex_count, properties, in_vertex, before_vertex = None, None, [], False, 0
    for line in header:
        words = line.split()
        if not words:
            continue
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            in_vertex = words[1] == "vertex"
            if in_vertex:
                vertex_count = int(words[2])
            elif vertex_count is None:
                before_vertex += 1
        elif words[0] == "property" and in_vertex:
            if words[1] == "list":
                raise ScanFormatError(f"{path}: list properties in the vertex element are not supported")
            if words[1] not in _PLY_TYPES:
                raise ScanFormatError(f"{path}: unknown PLY type {words[1]!r}")
            properties.append((words[2], _PLY_TYPES[words[1]]))
    if vertex_count is None or not properties:
        raise ScanFormatError(f"{path}: no vertex element")
    if before_vertex:
        raise ScanFormatError(f"{path}: elements before 'vertex' are not supported")
    columns = _xyz_columns([name for name, _ in properties], path)
    if fmt == "ascii":
        return _finish(_ascii_rows(data[body_start:], vertex_count, path, "vertex")[:, columns], path)
    if fmt == "binary_little_endian":
        dtype = np.dtype([(name, "<" + code) for name, code in properties])
        return _binary_xyz(data, body_start, dtype, vertex_count, path)
    raise ScanFormatError(f"{path}: PLY format {fmt!r} not supported (ascii or binary_little_endian)")


def read_pcd(path: Path) -> np.ndarray:
    data = path.read_bytes()
    header, body_start = _read_header(data, b"DATA", path)
    fields: dict[str, list[str]] = {}
    for line in header:
        words = line.split()
        if words and not words[0].startswith("#"):
            fields[words[0].upper()] = words[1:]
    names = fields.get("FIELDS", [])
    columns = _xyz_columns(names, path)
    points = int(fields.get("POINTS", [0])[0])
    kind = fields.get("DATA", [""])[0]
    if kind == "ascii":
        return _finish(_ascii_rows(data[body_start:], points, path, "point")[:, columns], path)
    if kind == "binary":
        sizes, types = fields.get("SIZE", []), fields.get("TYPE", [])
        counts = fields.get("COUNT", ["1"] * len(names))
        if not (len(sizes) == len(types) == len(counts) == len(names)):
            raise ScanFormatError(f"{path}: FIELDS, SIZE, TYPE and COUNT disagree")
        dtype = np.dtype([(n, f"<{ {'F': 'f', 'I': 'i', 'U': 'u'}[t] }{s}", (int(c),) if int(c) > 1 else ())
                          for n, s, t, c in zip(names, sizes, types, counts)])
        return _binary_xyz(data, body_start, dtype, points, path)
    raise ScanFormatError(f"{path}: PCD DATA {kind!r} not supported (ascii or binary; not binary_compressed)")


def read_text(path: Path) -> np.ndarray:
    """Whitespace- or comma-separated x y z [extra columns]; '#' comments and one header line allowed."""
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        values = [v for v in re.split(r"[,\s;]+", line) if v]
        try:
            rows.append([float(v) for v in values[:3]])
        except ValueError:
            if rows:
                raise ScanFormatError(f"{path}:{number}: not numeric: {line[:60]!r}") from None
            continue  # a header line
        if len(rows[-1]) < 3:
            raise ScanFormatError(f"{path}:{number}: fewer than 3 values")
    return _finish(np.array(rows), path)


def read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ScanFormatError(f"{path}: unreadable .npy ({err})") from None
    if array.ndim != 2 or array.shape[1] < 3:
        raise ScanFormatError(f"{path}: expected an (N, 3) array, got {array.shape}")
    return _finish(array[:, :3], path)


def read_points(path: str | Path) -> np.ndarray:
    """The (N, 3) points of a scan file, in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ScanFormatError(f"{path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    if not path.is_file():
        raise ScanFormatError(f"{path}: file not found")
    reader = {".ply": read_ply, ".pcd": read_pcd, ".npy": read_npy}.get(suffix, read_text)
    return reader(path)
