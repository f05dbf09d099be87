"""The counters file: what `jexit.counters.Counters` saves and loads.

Format `jexit-counters`, version 1: a `.npz` of plain arrays, read with
`allow_pickle=False` after every member's `.npy` header was checked (dtype
and shape) against the JSON header, so a hostile file cannot make the reader
allocate more than the header's bounded sizes:

| key            | shape    | dtype   | meaning |
|----------------|----------|---------|---------|
| `header`       | `[]`     | unicode | JSON object, see `HEADER_FIELDS` |
| `occupancy`    | `[K, S]` | int64   | inputs that reached ramp k with their signal in bin s |
| `nan`          | `[K]`    | int64   | inputs that reached ramp k with a NaN signal (no bin) |
| `stop_hist`    | `[K]`    | int64   | inputs that stopped at ramp k |
| `output_hist`  | `[K]`    | int64   | inputs whose output is ramp k's prediction |
| `audit_conf`   | `[A, K]` | float64 | audited rows' max softmax (iff header.audit_rows) |
| `audit_pred`   | `[A, K]` | int64   | audited rows' predictions (iff header.audit_rows) |
| `audit_output` | `[A]`    | int64   | the ramp the policy served for each audited row |
| `audit_signal` | `[A, K]` | float64 | audited rows' custom signal (iff header.audit_signal) |

This module writes and reads the arrays and checks the header against the
members; `Counters.save` and `Counters.load` check the counts' consistency
rules (`jexit.counters`). numpy and the standard library only.
"""

import json
import math
import os
import re
import zipfile
import zlib

import numpy as np

FORMAT_NAME = "jexit-counters"
FORMAT_VERSION = 1
MAX_RAMPS = 4096
MAX_BINS = 1 << 20
MAX_ELEMENTS = 1 << 27  # per array member: 1 GiB of float64
MAX_HEADER_CHARS = 1 << 16
MAX_COUNT = (1 << 63) - 1

# name -> (required, accepted Python types, meaning)
HEADER_FIELDS = {
    "format": (True, (str,), f"always {FORMAT_NAME!r}"),
    "format_version": (True, (int,), "integer version of this layout"),
    "num_ramps": (True, (int,), "K"),
    "num_bins": (True, (int,), "S"),
    "policy_sha256": (True, (str, type(None)), "`policy_sha256` of the policy counted, or null"),
    "num_inputs": (True, (int,), "inputs served"),
    "audited": (True, (int,), "inputs audited (run to the final ramp)"),
    "audit_agree": (True, (int,), "audited inputs whose served output agreed with the final ramp"),
    "audit_rows": (True, (bool,), "whether the audited rows are kept (audit_* arrays)"),
    "audit_signal": (True, (bool,), "whether the audited rows carry a custom signal"),
}


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _bad(path, what):
  raise ValueError(f"counters file {path}: {what}")


def _check_digest(name, digest):
  if digest is not None and not (isinstance(digest, str)
                                 and re.fullmatch(r"[0-9a-f]{64}", digest)):
    raise ValueError(f"{name}: expected 64 lowercase hex digits or None, got {digest!r}")


def write(path, header: dict, arrays: dict) -> None:
  """Writes a counters file; atomically replaces `path`.

  Args:
    path: the file, written exactly there (no ".npz" added).
    header: the `HEADER_FIELDS` but `format` and `format_version`.
    arrays: key -> array, as in the module docstring.
  """
  path = os.fspath(path)
  header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **header}
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:  # a file object: numpy adds no ".npz" to the name
      np.savez_compressed(f, header=np.array(json.dumps(header, sort_keys=True)), **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read(path):
  """Reads a counters file: no pickle, bounded allocation.

  Returns:
    `(header, arrays)`: the checked header (a dict) and key -> array, counts
    as int64 and audited confidences and signals as float64, every shape as
    the header says. The consistency rules are the caller's to check.

  Raises:
    ValueError: naming the field, for an unreadable, corrupt or oversized
      file, a missing or unknown key, or an unknown version.
  """
  path = os.fspath(path)
  try:
    archive = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
    _bad(path, f"could not read it as a .npz (zip) archive ({type(e).__name__}: {e})")
  with archive:
    names = archive.namelist()
    if len(set(names)) != len(names):
      _bad(path, f"duplicate members in the archive: {sorted(names)}")
    if not all(name.endswith(".npy") for name in names):
      _bad(path, f"expected only .npy members, got {sorted(names)}")
    keys = {name[:-4] for name in names}
    if "header" not in keys:
      _bad(path, f"missing key 'header' (not a jexit counters file?); keys: {sorted(keys)}")
    raw = _read_member(archive, path, "header", None, "U", MAX_HEADER_CHARS)
    try:
      header = json.loads(str(raw))
    except (json.JSONDecodeError, RecursionError) as e:
      _bad(path, f"header: not valid JSON ({type(e).__name__}: {e})")
    header = _check_header(header, path)
    k, s, a = header["num_ramps"], header["num_bins"], header["audited"]
    shapes = {"occupancy": (k, s), "nan": (k,), "stop_hist": (k,), "output_hist": (k,)}
    if header["audit_rows"]:
      shapes.update(audit_conf=(a, k), audit_pred=(a, k), audit_output=(a,))
    if header["audit_signal"]:
      shapes["audit_signal"] = (a, k)
    unknown = sorted(keys - set(shapes) - {"header"})
    missing = [key for key in shapes if key not in keys]
    if unknown:
      _bad(path, f"unknown key(s) {unknown}; expected {['header'] + list(shapes)}")
    if missing:
      _bad(path, f"missing key(s) {missing}; expected {['header'] + list(shapes)}")
    arrays = {}
    for key, shape in shapes.items():
      kinds = "f" if key in ("audit_conf", "audit_signal") else "iu"
      arrays[key] = _read_member(archive, path, key, shape, kinds, MAX_ELEMENTS)
  out = {}
  for key, v in arrays.items():
    if v.dtype.kind == "u" and v.size and v.max() > MAX_COUNT:
      _bad(path, f"{key}: expected values below 2**63, got {int(v.max())}")
    out[key] = v.astype(np.float64 if v.dtype.kind == "f" else np.int64)
  return header, out


def _check_header(header, path) -> dict:
  """Validates a counters header (a dict parsed from JSON); returns it."""
  if not isinstance(header, dict):
    _bad(path, f"header: expected a JSON object, got {type(header).__name__}")
  if header.get("format") != FORMAT_NAME:
    _bad(path, f"header.format: expected {FORMAT_NAME!r}, got {header.get('format')!r} "
               f"(not a jexit counters file?)")
  version = header.get("format_version")
  if not _is_int(version):
    _bad(path, f"header.format_version: expected an integer, got {version!r}")
  if version != FORMAT_VERSION:
    _bad(path, f"header.format_version: this jexit reads format version {FORMAT_VERSION}, "
               f"the file has version {version}"
               + ("; upgrade jexit to read it" if version > FORMAT_VERSION else ""))
  unknown = sorted(set(header) - set(HEADER_FIELDS))
  if unknown:
    _bad(path, f"header: unknown field(s) {unknown} for format version {FORMAT_VERSION}")
  for name, (required, types, meaning) in HEADER_FIELDS.items():
    if name not in header:
      _bad(path, f"header.{name}: missing ({meaning})")
    value = header[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
      _bad(path, f"header.{name}: expected {' or '.join(t.__name__ for t in types)} "
                 f"({meaning}), got {value!r}")
  for name, lo, hi in (("num_ramps", 1, MAX_RAMPS), ("num_bins", 1, MAX_BINS),
                       ("num_inputs", 0, MAX_COUNT), ("audited", 0, MAX_COUNT),
                       ("audit_agree", 0, MAX_COUNT)):
    if not lo <= header[name] <= hi:
      _bad(path, f"header.{name}: expected an integer in [{lo}, {hi}], got {header[name]}")
  k, s = header["num_ramps"], header["num_bins"]
  if k * s > MAX_ELEMENTS:
    _bad(path, f"header.num_ramps, num_bins: expected K * S <= {MAX_ELEMENTS}, got {k} * {s}")
  if header["audit_rows"] and header["audited"] * k > MAX_ELEMENTS:
    _bad(path, f"header.audited: {header['audited']} audited rows of K = {k} ramps exceed "
               f"{MAX_ELEMENTS} values per array; save fewer rows per file")
  if header["audit_signal"] and not header["audit_rows"]:
    _bad(path, "header.audit_signal: true without audit_rows")
  try:
    _check_digest("policy_sha256", header["policy_sha256"])
  except ValueError as e:
    _bad(path, f"header.{e}")
  return header


def _read_member(archive, path, key, shape, kinds, max_elements) -> np.ndarray:
  """Reads member `key` after checking its `.npy` header: dtype kind in
  `kinds`, `shape` (None: 0-d), and at most `max_elements` values (for a
  unicode scalar: characters). Nothing is allocated before the checks pass."""
  try:
    with archive.open(key + ".npy") as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        found, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version in ((2, 0), (3, 0)):
        found, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        _bad(path, f"{key}: unknown .npy format version {version}")
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, RuntimeError) as e:
    if isinstance(e, ValueError) and str(e).startswith("counters file"):
      raise
    _bad(path, f"{key}: not a readable .npy member ({type(e).__name__}: {e})")
  if dtype.hasobject or dtype.kind not in kinds or dtype.fields is not None:
    want = {"U": "unicode text", "f": "floating-point values", "iu": "integers"}[kinds]
    _bad(path, f"{key}: expected {want}, got dtype {dtype}")
  count = math.prod(found) if found else 1
  if shape is None:
    if found != ():
      _bad(path, f"{key}: expected a 0-d array, got shape {found}")
    count = dtype.itemsize // 4  # unicode characters
  elif tuple(found) != tuple(shape):
    _bad(path, f"{key}: expected shape {tuple(shape)} (from the header), got shape {found}")
  if count > max_elements:
    _bad(path, f"{key}: {count} values exceed the limit of {max_elements}")
  try:
    with archive.open(key + ".npy") as f:
      return np.lib.format.read_array(f, allow_pickle=False)
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, RuntimeError) as e:
    _bad(path, f"{key}: corrupt data ({type(e).__name__}: {e})")

