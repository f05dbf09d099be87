"""Reads `.npz` archives of plain arrays: never unpickles, never over-allocates.

Trace files and policy files are read here (counters files, whose header
fixes every member's shape, in `jexit.counters_file`). Before any array is
allocated, every member's `.npy` header is read from the zip and checked: a
plain (non-object) dtype, and a size the host can hold. A file that claims a
huge shape is refused with a `ValueError`, not a `MemoryError`.
"""

import os
import zipfile
import zlib
from typing import Dict

import numpy as np

from jexit import checks

_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def available_host_bytes() -> int:
  """Bytes of host memory available now (`jexit.checks.available_bytes`)."""
  return checks.available_bytes()


def _member_header(archive: zipfile.ZipFile, name: str):
  """`(shape, dtype, header bytes)` from a member's `.npy` header, without
  reading its data."""
  with archive.open(name) as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
      shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      raise ValueError(f"unsupported .npy format version {version}")
    offset = f.tell()
  return shape, dtype, offset


# Deflate expands at most about 1032-fold: a member's stated size beyond that
# of its compressed bytes is a lie (a zip's directory states both).
_DEFLATE_RATIO = 1032


def _member_bytes(info: zipfile.ZipInfo) -> int:
  """The most bytes a member can really hold once decompressed."""
  if info.compress_type == zipfile.ZIP_STORED:
    return min(info.file_size, info.compress_size)
  if info.compress_type == zipfile.ZIP_DEFLATED:
    return min(info.file_size, info.compress_size * _DEFLATE_RATIO)
  return info.file_size


def read_npz(path, what: str, *, max_bytes=None) -> Dict[str, np.ndarray]:
  """Every array of the `.npz` at `path`, as `{key: array}`.

  Args:
    path: the file.
    what: how errors name it, e.g. `"trace file"`.
    max_bytes: the most bytes one array may take once loaded (default: half
      the host memory available now).

  Raises:
    ValueError: `"{what} {path}: ..."` for an unreadable file, a single
      `.npy` or anything that is not a zip archive, a member that is not a
      plain array (object dtypes would need pickle), one whose header claims
      more than `max_bytes`, or corrupt data.
  """
  path = os.fspath(path)
  fail = lambda msg: ValueError(f"{what} {path}: {msg}")
  try:
    with open(path, "rb") as f:
      magic = f.read(6)
  except OSError as e:
    raise fail(f"could not read it ({e})") from e
  if magic.startswith(b"\x93NUMPY"):
    raise fail("expected a .npz archive of named arrays, got a single .npy array")
  if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
    # np.load would try to unpickle anything else; say what it really is.
    raise fail(f"could not read it as a .npz archive: not a zip archive (first bytes "
               f"{magic!r})")
  limit = available_host_bytes() // 2 if max_bytes is None else int(max_bytes)
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      for name in names:
        key = name[:-4] if name.endswith(".npy") else name
        try:
          shape, dtype, offset = _member_header(archive, name)
        except _READ_ERRORS as e:
          raise fail(f"key '{key}' is corrupt or not a plain array ({e})") from e
        if dtype.hasobject:
          raise fail(f"key '{key}': expected a plain array, got dtype {dtype} (object "
                     f"arrays need pickle, which jexit never runs)")
        size = int(np.prod(shape, dtype=object)) * dtype.itemsize
        # numpy allocates the whole array before it reads the data: a header
        # may not claim more than the member holds.
        holds = _member_bytes(archive.getinfo(name)) - offset
        if size > holds:
          raise fail(f"key '{key}': its header claims shape {tuple(shape)} of {dtype} "
                     f"({size} bytes), but the member holds only {max(holds, 0)} bytes of "
                     f"data")
        if size > limit:
          raise fail(f"key '{key}': its header claims shape {tuple(shape)} of {dtype} "
                     f"({size / 2**30:.3g} GiB), more than the {limit / 2**30:.3g} GiB "
                     f"allowed (half the memory available)")
  except zipfile.BadZipFile as e:
    raise fail(f"could not read it as a .npz archive ({e})") from e
  except (OSError, EOFError, zlib.error) as e:
    raise fail(f"could not read it as a .npz archive ({e})") from e
  try:
    data = np.load(path, allow_pickle=False)
  except _READ_ERRORS as e:
    raise fail(f"could not read it as a .npz archive ({e})") from e
  with data:
    out = {}
    for key in data.files:
      try:
        out[key] = data[key]
      except _READ_ERRORS as e:
        raise fail(f"key '{key}' is corrupt or not a plain array ({e})") from e
  return out
