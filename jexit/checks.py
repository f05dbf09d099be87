"""Guards for what a careless or hostile input can ask of the host.

Every allocation whose size a user controls (bins, lam values x models,
threshold grids, class ids, array headers in a file) is checked here against
the memory available *before* it is made: more than half of it is refused
with a `ValueError` naming the option, not a `MemoryError` or a killed
process. Output paths are checked before the work that produces them.
docs/untrusted.md lists what is checked where.
"""

import os
import resource
from typing import Optional, Sequence

import numpy as np

# The share of the available memory one user-sized allocation may take.
MEMORY_SHARE = 0.5
# Extensions matplotlib writes (`fig.savefig` picks the format from them).
PLOT_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff",
                   ".webp")


def _meminfo_available() -> Optional[int]:
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
    return None


def _cgroup_available() -> Optional[int]:
  """The container's memory limit less its usage (cgroup v2), if it has one."""
  try:
    with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
      limit = f.read().strip()
    if limit == "max":
      return None
    with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
      return int(limit) - int(f.read().strip())
  except (OSError, ValueError):
    return None


def _address_space_available() -> Optional[int]:
  """`RLIMIT_AS` less this process's virtual size, if the limit is set."""
  try:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
  except (OSError, ValueError, AttributeError):
    return None
  if soft == resource.RLIM_INFINITY:
    return None
  try:
    with open("/proc/self/statm", encoding="ascii") as f:
      used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    used = 0
  return soft - used


def available_bytes() -> int:
  """Bytes of host memory this process can use now: the least of MemAvailable,
  the cgroup's headroom and the address-space limit (8 GiB if none is known)."""
  known = [v for v in (_meminfo_available(), _cgroup_available(), _address_space_available())
           if v is not None]
  return max(min(known), 0) if known else 8 * 2 ** 30


def _gib(nbytes) -> str:
  return f"{nbytes / 2 ** 30:.3g} GiB"


def check_bytes(option: str, value, what: str, nbytes, *, limit=None,
                hint: Optional[str] = None) -> None:
  """Refuses an allocation of `nbytes` (for `what`) that `option=value` asks for.

  Raises:
    ValueError: `"{option}={value!r}: {what} need X GiB, more than half the
      available memory (Y GiB)"` (`"{option}: ..."` if `value` is None) when `nbytes` is over `limit` (default: half
      of `available_bytes()`).
  """
  nbytes = int(nbytes)
  if limit is None:
    free = available_bytes()
    limit = int(free * MEMORY_SHARE)
    where = f"more than half the available memory ({_gib(free)})"
  else:
    where = f"more than the {_gib(limit)} allowed"
  if nbytes > limit:
    named = option if value is None else f"{option}={value!r}"
    raise ValueError(f"{named}: {what} need {_gib(nbytes)}, {where}; "
                     f"{hint or f'use a smaller {option}'}")


def array_bytes(shape: Sequence[int], dtype=np.float64) -> int:
  """Bytes of an array of `shape` and `dtype`, in exact integer arithmetic."""
  n = 1
  for d in shape:
    n *= int(d)
  return n * np.dtype(dtype).itemsize


def check_array(option: str, value, shape: Sequence[int], dtype=np.float64, what: str = "",
                *, copies: int = 1, hint: Optional[str] = None) -> None:
  """`check_bytes` for `copies` arrays of `shape` and `dtype`, described as
  e.g. `[63, 10000, 10000] float64 transitions`."""
  desc = f"{list(int(d) for d in shape)} {np.dtype(dtype).name} {what}".strip()
  if copies > 1:
    desc = f"{copies} x {desc}"
  check_bytes(option, value, desc, copies * array_bytes(shape, dtype), hint=hint)


def check_output_path(flag: str, path, *, extensions: Optional[Sequence[str]] = None,
                      folder: bool = False) -> str:
  """Checks, before any work, that `path` can be written; returns it as a str.

  A file path must not be a folder, its folder must exist and be writable, an
  existing file must be writable, and with `extensions` its extension must be
  one of them. With `folder=True` the path is a folder to write into: it or
  its nearest existing parent must be a writable folder.

  Raises:
    ValueError: naming `flag`, what was expected and the path.
  """
  if path is None or not isinstance(path, (str, bytes, os.PathLike)) or os.fspath(path) == "":
    raise ValueError(f"{flag}: expected a path to write, got {path!r}")
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  if folder:
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f"{flag}: expected a folder for the outputs, got the file {path!r}")
    # A new folder is made with its parents: the nearest existing one must
    # be a writable folder.
    target = os.path.abspath(path)
    while not os.path.exists(target) and os.path.dirname(target) != target:
      target = os.path.dirname(target)
    if not os.path.isdir(target):
      raise ValueError(f"{flag}: cannot make the folder {path!r}: {target!r} is a file")
    if not os.access(target, os.W_OK | os.X_OK):
      raise ValueError(f"{flag}: cannot write into the folder {target!r} (permission denied)")
    return path
  if os.path.isdir(path):
    raise ValueError(f"{flag}: expected a file to write, got the folder {path!r}")
  if not os.path.isdir(parent):
    raise ValueError(f"{flag}: the folder {parent!r} of {path!r} does not exist")
  if extensions is not None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
      raise ValueError(f"{flag}: expected a file ending in one of {list(extensions)}, got "
                       f"{path!r}")
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise ValueError(f"{flag}: cannot write the file {path!r} (permission denied)")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{flag}: cannot write into the folder {parent!r} (permission denied)")
  return path


FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32


def check_float32_range(name: str, values) -> None:
  """Refuses values the float32 solver would turn into inf or 0: nonzero
  magnitudes outside `[FLOAT32_TINY, FLOAT32_MAX]` (about 1.2e-38 to 3.4e38),
  or a total above `FLOAT32_MAX`.

  Raises:
    ValueError: naming `name`, the range and the first value outside it.
  """
  a = np.abs(np.asarray(values, np.float64))
  outside = (a != 0) & ((a < FLOAT32_TINY) | (a > FLOAT32_MAX))
  if np.any(outside):
    at = tuple(int(i) for i in np.argwhere(outside)[0])
    raise ValueError(f"{name}: expected 0 or magnitudes in [{FLOAT32_TINY:.3g}, "
                     f"{FLOAT32_MAX:.3g}] (float32's normal range: the solver works in "
                     f"float32 and would see inf or 0; rescale the values), got "
                     f"{float(np.asarray(values, np.float64)[at])!r} at index "
                     f"{at if len(at) > 1 else at[0]}")
  if a.sum() > FLOAT32_MAX:
    raise ValueError(f"{name}: expected a total of at most {FLOAT32_MAX:.3g} (float32's "
                     f"range; rescale the values), got {a.sum():.4g}")
