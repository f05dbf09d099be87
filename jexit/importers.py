"""Importers of traces recorded by other early-exit tools.

Apparate (SOSP '24) stores its profiles as pickles: `p["conf"][ramp][i]` is
ramp `ramp`'s confidence on input i (the last ramp is the backbone's output,
its confidence may be None) and `p["acc"][ramp][i]` whether that ramp's
prediction equals the backbone's. Unpickling runs whatever code the file names,
so `load_apparate` refuses unless the caller says `allow_pickle=True`, and even
then unpickles with `RestrictedUnpickler`, which admits only plain builtin
containers and numbers and numpy arrays of numbers, none larger than the
file's own bytes allow (docs/untrusted.md).
"""

import _codecs
import _compat_pickle
import importlib
import io
import os
import pickle
import pickletools
from typing import Optional, Sequence

import numpy as np

from jexit.traces import check_traces
from jexit.types import Traces

# Globals an Apparate pickle may name: plain builtin values, and numpy's
# array, dtype and scalar reconstruction (numpy 1.x `numpy.core`, numpy 2.x
# `numpy._core`). The ones that allocate what their arguments say
# (`bytearray(n)`, `_reconstruct(ndarray, shape, ...)`, `ndarray(shape)`)
# are admitted only through the bounded wrappers below.
_PLAIN = frozenset(("builtins", n) for n in ("list", "dict", "tuple", "set", "int", "float",
                                             "bool", "str"))
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
# The dtypes an Apparate profile holds: numbers and booleans.
_DTYPE_KINDS = "biuf"


class RefusedGlobal(pickle.UnpicklingError):
  """A pickle named a global that `RestrictedUnpickler` does not admit."""


class RefusedValue(RefusedGlobal):
  """A pickle asked an admitted global for something it does not admit (an
  object dtype, a size its own bytes cannot hold)."""


class _NdarrayType:
  """What a pickle's `numpy.ndarray` resolves to: a name `_reconstruct`
  accepts, not a constructor (`ndarray(shape)` allocates uninitialised memory)."""

  def __new__(cls, *args, **kwargs):
    raise RefusedValue("numpy.ndarray: a trace pickle rebuilds arrays from their data "
                       "(_reconstruct), it does not call ndarray(shape)")


def _plain_dtype(dtype, where):
  if not isinstance(dtype, np.dtype) or dtype.kind not in _DTYPE_KINDS or dtype.hasobject \
      or dtype.names is not None or dtype.subdtype is not None:
    raise RefusedValue(f"{where}: expected a numeric or boolean dtype, got {dtype!r}")
  return dtype


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only builtin values and numpy arrays of numbers.

  Any other global (`os.system`, `builtins.eval`, a class of some package)
  raises `RefusedGlobal` before it is imported or called. Nothing it builds
  can be larger than the pickle's own bytes allow: numpy arrays are rebuilt
  from the data in the file (numpy checks that the data matches the shape)
  and the constructors that take a size are refused one.
  """

  def __init__(self, file, *, max_bytes: int):
    super().__init__(file)
    self._max_bytes = int(max_bytes)

  def _bounded(self, nbytes, what):
    if nbytes > self._max_bytes:
      raise RefusedValue(
          f"{what} claims {nbytes} bytes, more than the pickle's {self._max_bytes} bytes "
          f"could hold")

  def _reconstruct(self, subtype, shape, dtype):
    # numpy's own pickles rebuild an empty (0,) array, then fill it from the
    # data (`__setstate__`, which checks the data's size against the shape).
    if subtype is not _NdarrayType:
      raise RefusedValue(f"_reconstruct: expected numpy.ndarray, got {subtype!r}")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
      raise RefusedValue(f"_reconstruct: expected a shape, got {shape!r}")
    self._bounded(int(np.prod(shape, dtype=object)), "an array")
    return _RECONSTRUCT(np.ndarray, shape, dtype)

  def _dtype(self, spec, align=False, copy=True):
    if not isinstance(spec, str) or len(spec) > 8:
      raise RefusedValue(f"dtype: expected a short type code like 'f8', got {spec!r}")
    return _plain_dtype(np.dtype(spec, bool(align), bool(copy)), "dtype")

  def _frombuffer(self, buf, dtype, shape, order):
    _plain_dtype(dtype, "_frombuffer")
    return _FROMBUFFER(buf, dtype, shape, order)

  def _scalar(self, dtype, *data):
    _plain_dtype(dtype, "scalar")
    return _SCALAR(dtype, *data)

  def _bytes(self, kind):
    def build(*args):
      # bytes(n) / bytearray(n) allocate n bytes: only copies of data are admitted.
      if args and not isinstance(args[0], (bytes, bytearray, str, list)):
        raise RefusedValue(f"{kind.__name__}: expected bytes, a str or a list, got "
                                     f"{type(args[0]).__name__}")
      if args:
        self._bounded(len(args[0]), kind.__name__)
      return kind(*args)
    return build

  def _encode(self, obj, encoding="utf-8", errors="strict"):
    # Protocol 2 stores bytes as `_codecs.encode(text, "latin1")`.
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
      raise RefusedValue(f"_codecs.encode: expected text and 'latin1', got "
                                   f"{type(obj).__name__} and {encoding!r}")
    return _codecs.encode(obj, encoding, errors)

  def find_class(self, module, name):
    # Python 2 era pickles (protocol <= 2) name `__builtin__` for `builtins`.
    canonical = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if (canonical, name) in _PLAIN:
      return super().find_class(module, name)
    special = {("builtins", "bytes"): lambda: self._bytes(bytes),
               ("builtins", "bytearray"): lambda: self._bytes(bytearray),
               ("_codecs", "encode"): lambda: self._encode,
               ("numpy", "ndarray"): lambda: _NdarrayType,
               ("numpy", "dtype"): lambda: self._dtype}
    special.update({(m, "_reconstruct"): lambda: self._reconstruct for m in _NUMPY_CORE})
    special.update({(m, "scalar"): lambda: self._scalar for m in _NUMPY_CORE})
    special.update({(m, "_frombuffer"): lambda: self._frombuffer for m in _NUMERIC})
    if (canonical, name) in special:
      return special[(canonical, name)]()
    raise RefusedGlobal(
        f"refusing to load global '{module}.{name}': only builtin values and numpy "
        f"arrays of numbers are allowed in a trace pickle")


def _numpy_function(modules, name):
  for m in modules:
    try:
      return getattr(importlib.import_module(m), name)
    except (ImportError, AttributeError):
      continue
  raise ImportError(f"numpy has no {name}")


# numpy's reconstruction functions (numpy 2.x names first).
_RECONSTRUCT = _numpy_function(_NUMPY_CORE[::-1], "_reconstruct")
_SCALAR = _numpy_function(_NUMPY_CORE[::-1], "scalar")
_FROMBUFFER = _numpy_function(_NUMERIC[::-1], "_frombuffer")


def restricted_loads(data: bytes):
  """`pickle.loads` through `RestrictedUnpickler`: nothing it builds may claim
  more bytes than `data` has."""
  data = bytes(data)
  # The unpickler allocates a counted bytes/str (BINBYTES8, ...) before it
  # reads it: a 20-byte pickle can ask for gigabytes. pickletools reads each
  # count against what is left, so a claim beyond the data fails here first.
  try:
    for _ in pickletools.genops(data):
      pass
  except ValueError as e:
    raise RefusedValue(f"not a readable pickle ({e})") from None
  return RestrictedUnpickler(io.BytesIO(data), max_bytes=len(data)).load()


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
  except RefusedValue as e:
    raise ValueError(f"apparate file {path}: refusing the pickle: {e}") from e
  except RefusedGlobal as e:
    raise ValueError(f"apparate file {path}: {e}") from e
  except Exception as e:  # a truncated or corrupt pickle raises many kinds
    raise ValueError(f"apparate file {path}: not a readable pickle "
                     f"({type(e).__name__}: {e})") from e
  return apparate_to_traces(profile, cost)
