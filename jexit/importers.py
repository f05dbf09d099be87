"""Importers of traces recorded by other early-exit tools.

Apparate (SOSP '24) stores its profiles as pickles: `p["conf"][ramp][i]` is
ramp `ramp`'s confidence on input i (the last ramp is the backbone's output,
its confidence may be None) and `p["acc"][ramp][i]` whether that ramp's
prediction equals the backbone's. Unpickling runs whatever code the file names,
so `load_apparate` refuses unless the caller says `allow_pickle=True`, and even
then unpickles with `RestrictedUnpickler`, which admits only plain builtin
containers and numbers and numpy arrays.
"""

import _compat_pickle
import io
import os
import pickle
from typing import Optional, Sequence

import numpy as np

from jexit.traces import check_traces
from jexit.types import Traces

# Globals a trace pickle may name: plain builtin values and numpy's array and
# scalar reconstruction (numpy 1.x `numpy.core`, numpy 2.x `numpy._core`).
_ALLOWED = frozenset(
    [("builtins", n) for n in ("list", "dict", "tuple", "set", "frozenset", "int", "float",
                               "bool", "str", "bytes", "bytearray", "complex")]
    + [("collections", "OrderedDict"), ("_codecs", "encode")]  # protocol 2 bytes
    + [(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
       for n in ("_reconstruct", "scalar")]
    + [(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + [("numpy", n) for n in ("float16", "float32", "float64", "int8", "int16", "int32",
                              "int64", "uint8", "uint16", "uint32", "uint64", "bool_")]
    + [("numpy.dtypes", n) for n in ("Float16DType", "Float32DType", "Float64DType",
                                     "Int8DType", "Int16DType", "Int32DType", "Int64DType",
                                     "UInt8DType", "UInt16DType", "UInt32DType",
                                     "UInt64DType", "BoolDType")])


class RefusedGlobal(pickle.UnpicklingError):
  """A pickle named a global that `RestrictedUnpickler` does not admit."""


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only builtin containers/numbers and numpy arrays.

  Any other global (`os.system`, `builtins.eval`, a class of some package)
  raises `RefusedGlobal` before it is imported or called.
  """

  def find_class(self, module, name):
    # Python 2 era pickles (protocol <= 2) name `__builtin__` for `builtins`.
    canonical = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if (canonical, name) in _ALLOWED:
      return super().find_class(module, name)
    raise RefusedGlobal(
        f"refusing to load global '{module}.{name}': only builtin values and numpy "
        f"arrays are allowed in a trace pickle")


def restricted_loads(data: bytes):
  """`pickle.loads` through `RestrictedUnpickler`."""
  return RestrictedUnpickler(io.BytesIO(data)).load()


def _column(values, name: str, ramp: int, n: Optional[int]):
  if isinstance(values, np.ndarray):
    values = values.tolist()
  if not isinstance(values, (list, tuple)):
    raise ValueError(f"apparate['{name}'][{ramp}]: expected a list of per-input values, "
                     f"got {type(values).__name__}")
  if n is not None and len(values) != n:
    raise ValueError(f"apparate['{name}'][{ramp}]: expected {n} inputs like ramp 0, "
                     f"got {len(values)}")
  return list(values)


def _flag(v) -> bool:
  # bool("no") is True: only booleans and 0/1 say whether a ramp agreed.
  if isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, float, np.number)) and v in (0, 1)):
    return bool(v)
  raise ValueError(f"expected a boolean or 0/1 agreement, got {v!r}")


def apparate_to_traces(profile, cost: Optional[Sequence[float]] = None) -> Traces:
  """Converts an unpickled Apparate profile `{"conf": [...], "acc": [...]}` to `Traces`.

  Apparate records only whether each ramp agrees with the backbone, not the
  classes, so `pred` is encoded as 0 = the backbone's class and 1 = another
  one: agreement metrics are exact, `label` is None (no accuracy). The last
  ramp's confidence, when missing (None), is set to 1; its agreement is True.

  Args:
    profile: the unpickled dict.
    cost: `[K]` segment costs (Apparate keeps latencies elsewhere); default 1
      per segment.

  Returns:
    Validated `Traces` with K = the number of ramps in `profile["conf"]`.
  """
  if not isinstance(profile, dict) or "conf" not in profile or "acc" not in profile:
    keys = sorted(map(str, profile)) if isinstance(profile, dict) else type(profile).__name__
    raise ValueError(f"apparate profile: expected a dict with keys 'conf' and 'acc', got {keys}")
  confs, accs = profile["conf"], profile["acc"]
  if isinstance(confs, np.ndarray):
    confs = list(confs)
  if isinstance(accs, np.ndarray):
    accs = list(accs)
  if not isinstance(confs, (list, tuple)) or not isinstance(accs, (list, tuple)) \
      or len(confs) < 1 or len(confs) != len(accs):
    raise ValueError("apparate profile: expected 'conf' and 'acc' to be lists with one "
                     "entry per ramp, of equal length")
  k = len(confs)
  n = len(_column(confs[0], "conf", 0, None))
  conf = np.empty((n, k))
  agree = np.empty((n, k), bool)
  for r in range(k):
    c = _column(confs[r], "conf", r, n)
    a = _column(accs[r], "acc", r, n)
    last = r == k - 1
    try:
      conf[:, r] = [1.0 if (v is None and last) else float(v) for v in c]
      agree[:, r] = [True if (v is None and last) else _flag(v) for v in a]
    except (TypeError, ValueError) as e:
      raise ValueError(f"apparate['conf'/'acc'][{r}]: expected numbers and booleans "
                       f"({e})") from e
  agree[:, -1] = True  # the backbone agrees with itself
  pred = np.where(agree, 0, 1).astype(np.int64)
  if cost is None:
    cost = np.ones(k)
  else:
    try:
      cost = np.asarray(cost, np.float64)
    except (TypeError, ValueError) as e:
      raise ValueError(f"cost: expected [K={k}] numbers, got {cost!r}") from e
  return check_traces(Traces(conf=conf, pred=pred, label=None, cost=cost))


def load_apparate(path, *, allow_pickle: bool = False,
                  cost: Optional[Sequence[float]] = None) -> Traces:
  """Loads an Apparate-format pickled profile as `Traces`.

  Args:
    path: the pickle file.
    allow_pickle: must be True: unpickling a file can run code, so this is
      the caller's statement that the file is trusted enough to try. Even
      then only builtin values and numpy arrays are admitted.
    cost: `[K]` segment costs (default 1 per segment).

  Raises:
    ValueError: without `allow_pickle`, for a pickle naming any other
      global, or for a malformed profile.

  Examples:
    >>> import pickle, tempfile, os
    >>> from jexit.importers import load_apparate
    >>> path = os.path.join(tempfile.mkdtemp(), "p.pickle")
    >>> with open(path, "wb") as f:
    ...   pickle.dump({"conf": [[0.9, 0.4], [None, None]],
    ...                "acc": [[True, False], [True, True]]}, f)
    >>> load_apparate(path, allow_pickle=True).pred.tolist()
    [[0, 0], [1, 0]]
  """
  path = os.fspath(path)
  if not allow_pickle:
    raise ValueError(
        f"apparate file {path}: refusing to unpickle (a pickle can run code when "
        f"loaded); pass allow_pickle=True (--allow-pickle) for a file you trust")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"apparate file {path}: could not read it ({e})") from e
  try:
    profile = restricted_loads(data)
  except RefusedGlobal as e:
    raise ValueError(f"apparate file {path}: {e}") from e
  except Exception as e:  # a truncated or corrupt pickle raises many kinds
    raise ValueError(f"apparate file {path}: not a readable pickle "
                     f"({type(e).__name__}: {e})") from e
  return apparate_to_traces(profile, cost)
