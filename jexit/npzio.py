"""Reads `.npz` archives of plain arrays: never unpickles, never over-allocates.

Trace files, policy files and counters files are all read here. Before any
array is allocated, every member's `.npy` header is read from the zip and
checked: a plain (non-object) dtype, and a size the host can hold. A file
that claims a huge shape is refused with a `ValueError`, not a `MemoryError`.
"""

import os
import zipfile
import zlib
from typing import Dict

import numpy as np

_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def available_host_bytes() -> int:
  """Bytes of host memory available now (MemAvailable), or 8 GiB if unknown."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
  except (ValueError, OSError, AttributeError):
    return 8 * 2 ** 30


def _member_header(archive: zipfile.ZipFile, name: str):
  """`(shape, dtype)` from a member's `.npy` header, without reading its data."""
  with archive.open(name) as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
      shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      raise ValueError(f"unsupported .npy format version {version}")
  return shape, dtype


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
          shape, dtype = _member_header(archive, name)
        except _READ_ERRORS as e:
          raise fail(f"key '{key}' is corrupt or not a plain array ({e})") from e
        if dtype.hasobject:
          raise fail(f"key '{key}': expected a plain array, got dtype {dtype} (object "
                     f"arrays need pickle, which jexit never runs)")
        size = int(np.prod(shape, dtype=object)) * dtype.itemsize
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
