"""The policy file: writes one solved exit policy as a versioned `.npz`, and reads it.

The policy file (format `jexit-policy`, version 1) is a `.npz` of plain
arrays, read with `allow_pickle=False`:

| key         | shape      | dtype             | meaning |
|-------------|------------|-------------------|---------|
| `header`    | `[]`       | unicode           | JSON object, see `HEADER_FIELDS` |
| `edges`     | `[K, S+1]` | float64           | per-ramp bin edges of the exit signal |
| `loss`      | `[K, S]`   | float32 / float64 | `l_k(s)`, the loss of outputting ramp k from bin s |
| `threshold` | `[K, S]`   | same as `loss`    | stop thresholds: values of `loss` or +-inf |
| `cost`      | `[K]`      | float64           | `c_k`, cost of segment k plus its head |
| `calibration` | `[K-1, 2C+3]` | float64        | only for `"class"`: the weights of `class_signal` |

`header.signal` names an entry of `jexit.signals.REGISTRY`. Everything is
validated by the same checks when written and when read (never with pickle).
This module imports numpy only: the runtimes read policy files through it.
"""

import hashlib
import json
import os
import re
from typing import Optional

import numpy as np

from jexit import signals
from jexit.npzio import read_npz
from jexit.signals import class_weights_ok
from jexit.types import Binning, ExitModel, Policy, Traces, check_policy, is_int_scalar

__all__ = ["export_policy", "load_policy_file", "read_policy_arrays", "trace_sha256"]

FORMAT_NAME = "jexit-policy"
FORMAT_VERSION = 2
READS = (1, 2)  # the versions this jexit reads; version 2 adds optional fields only
ARRAY_KEYS = ("header", "edges", "loss", "threshold", "cost")
# Optional arrays (version 2): the fit rows' bin occupancy [K, S] and stop
# histogram [K], the reference deployment monitoring compares live counts with.
REFERENCE_KEYS = ("reference_occupancy", "reference_stops")
# name -> (required, accepted Python types, meaning)
HEADER_FIELDS = {
    "format": (True, (str,), f"always {FORMAT_NAME!r}"),
    "format_version": (True, (int,), "integer version of this layout"),
    "jexit_version": (True, (str,), "version of jexit that wrote the file"),
    "signal": (True, (str,), "the signal the edges bin: '1-conf', 'stability', 'class' or "
                             "'signal'"),
    "lam": (True, (int, float), "the cost weight lam the policy was solved for"),
    "recall": (True, (bool,), "whether the output is the best ramp so far"),
    "num_ramps": (True, (int,), "K"),
    "num_bins": (True, (int,), "S"),
    "cost": (True, (list,), "[K] segment costs, equal to the `cost` array"),
    "dtype": (True, (str,), "dtype of `loss` and `threshold` (the comparison dtype)"),
    "trace_sha256": (True, (str, type(None)), "sha256 of the fit trace, or null"),
    "value": (False, (int, float, type(None)), "expected objective under the fitted model"),
    "lam_index": (False, (int, type(None)), "index of lam in the solved grid"),
    "model_index": (False, (int, type(None)), "index of the model in a solved batch"),
    # Version 2:
    "budget": (False, (dict, type(None)), "the loss budget the table was chosen for, "
                                          "{max_loss, metric}, or null"),
    "certificate": (False, (dict, type(None)), "the certificate of a certified budget "
                                               "(jexit.certify), or null"),
    "active_ramps": (False, (list, type(None)), "the 0-based candidate ramps the table's K "
                                                "ramps are (ramp placement), or null: all"),
    "reference_inputs": (False, (int, type(None)), "fit rows counted in the reference "
                                                   "arrays, or null when there are none"),
}
_V2_FIELDS = ("budget", "certificate", "active_ramps", "reference_inputs")


def _bad(path, what):
  raise ValueError(f"policy file {path}: {what}")


def _describe(a):
  return f"shape {tuple(np.shape(a))} dtype {np.asarray(a).dtype}"


def _real(name, a) -> np.ndarray:
  """`a` as a float64 array, or a ValueError naming `name` (text, complex, ...)."""
  a = np.asarray(a)
  if a.dtype.kind not in "biuf":
    raise ValueError(f"{name}: expected real numbers, got {_describe(a)}")
  return a.astype(np.float64, copy=False)


def check_header(header, path="<memory>") -> dict:
  """Validates a policy header (a dict parsed from JSON); returns it.

  The format name and version are checked first, so a file written by a newer
  jexit gets a message about the version rather than about its contents.
  """
  if not isinstance(header, dict):
    _bad(path, f"header: expected a JSON object, got {type(header).__name__}")
  if header.get("format") != FORMAT_NAME:
    _bad(path, f"header.format: expected {FORMAT_NAME!r}, got {header.get('format')!r} "
               f"(not a jexit policy file?)")
  version = header.get("format_version")
  if not isinstance(version, int) or isinstance(version, bool):
    _bad(path, f"header.format_version: expected an integer, got {version!r}")
  if version not in READS:
    _bad(path, f"header.format_version: this jexit reads format versions "
               f"{list(READS)}, the file has version {version}"
               + ("; upgrade jexit to read it" if version > FORMAT_VERSION else ""))
  known = set(HEADER_FIELDS) - (set(_V2_FIELDS) if version == 1 else set())
  unknown = sorted(set(header) - known)
  if unknown:
    _bad(path, f"header: unknown field(s) {unknown} for format version {version}")
  for name, (required, types, meaning) in HEADER_FIELDS.items():
    if name not in header:
      if required:
        _bad(path, f"header.{name}: missing ({meaning})")
      continue
    value = header[name]
    # bool is an int in Python: only accept it where bool is the type asked.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
      _bad(path, f"header.{name}: expected {' or '.join(t.__name__ for t in types)} "
                 f"({meaning}), got {value!r}")
  if header["signal"] not in signals.NAMES:
    _bad(path, f"header.signal: expected one of {list(signals.NAMES)}, got "
               f"{header['signal']!r}")
  try:
    lam = float(header["lam"])
  except OverflowError:  # a JSON integer beyond float range
    lam = float("inf")
  if not np.isfinite(lam) or lam < 0:
    _bad(path, f"header.lam: expected a finite value >= 0, got {header['lam']!r}")
  for name in ("num_ramps", "num_bins"):
    if header[name] < 1:
      _bad(path, f"header.{name}: expected an integer >= 1, got {header[name]}")
  if header["dtype"] not in ("float32", "float64"):
    _bad(path, f"header.dtype: expected 'float32' or 'float64', got {header['dtype']!r}")
  digest = header["trace_sha256"]
  if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
    _bad(path, f"header.trace_sha256: expected 64 lowercase hex digits or null, got {digest!r}")
  cost = header["cost"]
  if (len(cost) != header["num_ramps"]
      or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in cost)):
    _bad(path, f"header.cost: expected a list of {header['num_ramps']} numbers, got {cost!r}")
  budget = header.get("budget")
  if budget is not None and (
      set(budget) != {"max_loss", "metric"} or budget["metric"] not in ("agreement", "accuracy")
      or not isinstance(budget["max_loss"], (int, float)) or isinstance(budget["max_loss"], bool)
      or not -1 <= budget["max_loss"] <= 1):
    _bad(path, f"header.budget: expected {{'max_loss': a number in [-1, 1], 'metric': "
               f"'agreement' or 'accuracy'}}, got {budget!r}")
  active = header.get("active_ramps")
  if active is not None and (
      len(active) != header["num_ramps"]
      or not all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in active)
      or any(b <= a for a, b in zip(active, active[1:]))):
    _bad(path, f"header.active_ramps: expected {header['num_ramps']} increasing candidate "
               f"ramp indices >= 0, got {active!r}")
  if header.get("certificate") is not None:
    check_certificate(header["certificate"], path, budget=budget)
  n_ref = header.get("reference_inputs")
  if n_ref is not None and n_ref < 1:
    _bad(path, f"header.reference_inputs: expected an integer >= 1 or null, got {n_ref!r}")
  return header


# The certificate of a certified budget (`jexit.report.certificate_to_dict`):
# field -> (accepted types, meaning); COMMON in both kinds, then per kind.
CERTIFICATE_TESTS = ("binomial", "hoeffding-bentkus", "wsr")  # jexit.certify.UNIT_TESTS
CERTIFICATE_QUANTITIES = ("disagreement", "harm")  # jexit.select_certify.CERTIFIED_LOSS
_NUM = (int, float)
_CERT_COMMON = {
    "certified": ((bool,), "true: a certificate; false: nothing certified, the backbone ships"),
    "eps": (_NUM, "the loss budget certified, in (0, 1)"),
    "delta": (_NUM, "the failure probability, in (0, 1)"),
    "test": ((str,), f"one of {list(CERTIFICATE_TESTS)}"),
    "units": ((int,), "independent calibration units, >= 1"),
    "block": ((int,), "rows per unit, >= 1"),
    "rows": ((int,), "calibration rows, >= units"),
    "rows_sha256": ((str, type(None)), "sha256 of the calibration row indices, or null"),
    "method": ((str, type(None)), "the method whose candidate path was tested"),
    "quantity": ((str,), f"the per-row loss certified, one of {list(CERTIFICATE_QUANTITIES)}"),
}
_CERT_KIND = {
    True: {"index": ((int,), "the certified entry of the method's parameter grid"),
           "loss": (_NUM, "observed mean loss on the calibration units, in [0, 1]"),
           "ucb": (_NUM, "its upper confidence bound at 1 - delta, in [0, 1]"),
           "pvalue": (_NUM, "its p-value against eps, in [0, delta]"),
           "accepted": ((int,), "candidates accepted by the fixed-sequence walk, >= 1")},
    False: {"needed_units": ((int,), "units eps needs at delta with zero loss, >= 1"),
            "smallest_certifiable": (_NUM, "the smallest budget these units certify, (0, 1]"),
            "loss": (_NUM + (type(None),), "the safest candidate's loss, or null"),
            "ucb": (_NUM + (type(None),), "its upper confidence bound, or null"),
            "pvalue": (_NUM + (type(None),), "its p-value, above delta, or null")},
}


def check_certificate(cert, path="<memory>", *, budget=None) -> dict:
  """Validates a certificate dict (header.certificate); returns it.

  Every field of its kind must be there with its type, nothing else; the
  numbers must be consistent (eps and delta in (0, 1); a certificate's
  p-value at most delta, a fallback's above it; eps equal to the budget's
  max_loss when the header has a budget).
  """
  where = "header.certificate"
  if not isinstance(cert, dict):
    _bad(path, f"{where}: expected an object or null, got {cert!r}")
  kind = cert.get("certified")
  if not isinstance(kind, bool):
    _bad(path, f"{where}.certified: expected true or false, got {kind!r}")
  fields = {**_CERT_COMMON, **_CERT_KIND[kind]}
  unknown, missing = sorted(set(cert) - set(fields)), sorted(set(fields) - set(cert))
  if unknown or missing:
    _bad(path, f"{where}: expected the fields {sorted(fields)} (certified: {kind}); unknown "
               f"{unknown}, missing {missing}")
  for name, (types, meaning) in fields.items():
    v = cert[name]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
      _bad(path, f"{where}.{name}: expected {meaning}, got {v!r}")
    if isinstance(v, float) and not np.isfinite(v):
      _bad(path, f"{where}.{name}: expected a finite number, got {v!r}")

  def need(name, ok):
    if not ok:
      _bad(path, f"{where}.{name}: expected {fields[name][1]}, got {cert[name]!r}")
  need("eps", 0 < cert["eps"] < 1)
  need("delta", 0 < cert["delta"] < 1)
  need("test", cert["test"] in CERTIFICATE_TESTS)
  need("quantity", cert["quantity"] in CERTIFICATE_QUANTITIES)
  need("units", cert["units"] >= 1)
  need("block", cert["block"] >= 1)
  need("rows", cert["rows"] >= cert["units"])
  digest = cert["rows_sha256"]
  need("rows_sha256", digest is None or re.fullmatch(r"[0-9a-f]{64}", digest))
  if kind:
    need("index", cert["index"] >= 0)
    need("loss", 0 <= cert["loss"] <= 1)
    need("ucb", cert["loss"] <= cert["ucb"] <= 1)
    need("pvalue", 0 <= cert["pvalue"] <= cert["delta"])
    need("accepted", cert["accepted"] >= 1)
  else:
    need("needed_units", cert["needed_units"] >= 1)
    need("smallest_certifiable", 0 < cert["smallest_certifiable"] <= 1)
    need("loss", cert["loss"] is None or 0 <= cert["loss"] <= 1)
    need("ucb", cert["ucb"] is None or 0 <= cert["ucb"] <= 1)
    need("pvalue", cert["pvalue"] is None or cert["delta"] < cert["pvalue"] <= 1)
  if budget is not None and cert["eps"] != budget.get("max_loss"):
    _bad(path, f"{where}.eps: {cert['eps']!r} differs from header.budget.max_loss "
               f"{budget.get('max_loss')!r}")
  return cert


def check_reference(header: dict, occupancy, stops, path="<memory>"):
  """The reference arrays of a version-2 file, `(occupancy [K, S], stops [K],
  num_inputs)` as int64, or None when the header has no `reference_inputs`."""
  n = header.get("reference_inputs")
  if n is None:
    if occupancy is not None or stops is not None:
      _bad(path, "reference_occupancy, reference_stops: present, but header."
                 "reference_inputs is null")
    return None
  k, s = header["num_ramps"], header["num_bins"]
  out = []
  for name, a, shape in (("reference_occupancy", occupancy, (k, s)),
                         ("reference_stops", stops, (k,))):
    if a is None:
      _bad(path, f"{name}: missing (header.reference_inputs is {n})")
    a = np.asarray(a)
    if a.shape != shape or a.dtype.kind not in "iu" or np.any(a < 0):
      _bad(path, f"{name}: expected counts >= 0 of shape {shape}, got {_describe(a)}")
    out.append(a.astype(np.int64))
  occupancy, stops = out
  if stops.sum() != n or occupancy[0].sum() != n:
    _bad(path, f"reference_stops, reference_occupancy: expected {n} inputs "
               f"(header.reference_inputs), got {int(stops.sum())} stops and "
               f"{int(occupancy[0].sum())} at ramp 0")
  reached = n - np.concatenate([[0], np.cumsum(stops)[:-1]])
  if not np.array_equal(occupancy.sum(1), reached):
    _bad(path, f"reference_occupancy: expected each ramp's row to count the inputs that "
               f"reached it, {reached.tolist()}, got {occupancy.sum(1).tolist()}")
  return occupancy, stops, int(n)


def check_arrays(header: dict, edges, loss, threshold, cost, path="<memory>"):
  """Validates the policy arrays against a checked header.

  Returns:
    `(edges [K, S+1] float64, loss [K, S], threshold [K, S], cost [K] float64)`
    with `loss` and `threshold` in `header["dtype"]`.
  """
  k, s = header["num_ramps"], header["num_bins"]
  dtype = np.dtype(header["dtype"])
  arrays = {"edges": edges, "loss": loss, "threshold": threshold, "cost": cost}
  shapes = {"edges": (k, s + 1), "loss": (k, s), "threshold": (k, s), "cost": (k,)}
  for name, a in arrays.items():
    a = np.asarray(a)
    if a.shape != shapes[name]:
      _bad(path, f"{name}: expected shape {shapes[name]} (K={k} ramps, S={s} bins "
                 f"from the header), got {_describe(a)}")
    if not np.issubdtype(a.dtype, np.floating):
      _bad(path, f"{name}: expected floating-point values, got {_describe(a)}")
  for name in ("loss", "threshold"):
    if np.asarray(arrays[name]).dtype != dtype:
      _bad(path, f"{name}: expected dtype {dtype} (header.dtype), "
                 f"got {np.asarray(arrays[name]).dtype}")
  edges = np.asarray(edges, np.float64)
  loss = np.asarray(loss)
  threshold = np.asarray(threshold)
  cost = np.asarray(cost, np.float64)
  if not np.all(np.isfinite(edges)):
    _bad(path, "edges: expected finite values, got NaN or inf")
  with np.errstate(over="ignore"):
    span = edges[:, -1] - edges[:, 0]
  if not np.all(np.isfinite(span)):  # the runtime's range check needs a finite span
    _bad(path, f"edges: expected a finite span per ramp, got edges from "
               f"{edges[:, 0].min()!r} to {edges[:, -1].max()!r}")
  steps = np.diff(edges, axis=1)
  if np.any(steps <= 0):
    ramp, i = np.argwhere(steps <= 0)[0]
    _bad(path, f"edges: expected strictly increasing edges per ramp, got "
               f"edges[{ramp}, {i}] = {edges[ramp, i]} >= edges[{ramp}, {i + 1}] = "
               f"{edges[ramp, i + 1]}")
  if not np.all(np.isfinite(loss)):
    _bad(path, "loss: expected finite values, got NaN or inf")
  if np.any(np.isnan(threshold)):
    _bad(path, "threshold: expected values of `loss` or +-inf, got NaN")
  finite = np.isfinite(threshold)
  # Exact membership is what makes the runtime's float compare agree with the
  # solver's decisions: anything else is a corrupt or foreign table.
  foreign = finite & ~np.isin(threshold, loss)
  if np.any(foreign):
    ramp, b = np.argwhere(foreign)[0]
    _bad(path, f"threshold: expected values of `loss` or +-inf, got "
               f"threshold[{ramp}, {b}] = {float(threshold[ramp, b])!r}, not in `loss`")
  if not np.all(threshold[-1] == np.inf):
    _bad(path, f"threshold: expected +inf at the last ramp (it always stops), got "
               f"{threshold[-1].tolist()}")
  cert = header.get("certificate")
  if isinstance(cert, dict) and cert.get("certified") is False and not np.all(
      threshold[:-1] == -np.inf):
    _bad(path, "threshold: a table whose certificate says nothing certified must be the "
               "backbone (-inf before the last ramp: it never exits early)")
  if not np.all(np.isfinite(cost)) or np.any(cost < 0):
    _bad(path, f"cost: expected finite values >= 0, got {cost.tolist()}")
  if not np.array_equal(cost, np.asarray(header["cost"], np.float64)):
    _bad(path, f"cost: the array {cost.tolist()} differs from header.cost {header['cost']}")
  return edges, loss.astype(dtype), threshold.astype(dtype), cost


def check_calibration(header: dict, calibration, path="<memory>"):
  """The `calibration` array of a `"class"` table as float64 (None for the
  other signals), or a ValueError naming the problem."""
  k = header["num_ramps"]
  if not signals.REGISTRY[header["signal"]].needs_calibration:
    if calibration is not None:
      _bad(path, f"calibration: only a 'class' table has one, got one with "
                 f"header.signal {header['signal']!r}")
    return None
  if calibration is None:
    _bad(path, "calibration: a 'class' table needs its weights [K-1, 2C+3], got none")
  a = np.asarray(calibration)
  if (a.ndim != 2 or a.shape[0] != k - 1 or a.shape[1] < 3 or a.shape[1] % 2 != 1
      or not np.issubdtype(a.dtype, np.floating)):
    _bad(path, f"calibration: expected float weights of shape [K-1={k - 1}, 2C+3], got "
               f"{_describe(a)}")
  if not np.all(np.isfinite(a)):
    _bad(path, "calibration: expected finite values, got NaN or inf")
  return a.astype(np.float64)


def read_policy_arrays(path):
  """Reads a policy file without pickle; returns validated
  `(header, edges, loss, threshold, cost, calibration, reference)`
  (calibration: None unless header.signal is "class"; reference:
  `(occupancy [K, S], stops [K], num_inputs)` or None, `check_reference`).

  Raises:
    ValueError: for an unreadable or corrupt file, missing or unknown keys, an
      unknown format version, or any header/array inconsistency.
  """
  path = os.fspath(path)
  arrays = read_npz(path, "policy file")
  keys = set(arrays)
  if "header" not in keys:
    _bad(path, f"missing key 'header' (not a jexit policy file?); keys: {sorted(keys)}")
  raw = arrays["header"]
  if raw.shape != () or raw.dtype.kind != "U":
    _bad(path, f"header: expected a 0-d unicode array holding JSON, got {_describe(raw)}")
  try:
    header = json.loads(str(raw))
  except (json.JSONDecodeError, RecursionError) as e:
    _bad(path, f"header: not valid JSON ({type(e).__name__}: {e})")
  # Version first: a newer layout may legitimately have other keys.
  header = check_header(header, path)
  needs = signals.REGISTRY[header["signal"]].needs_calibration
  expected = ARRAY_KEYS + (("calibration",) if needs else ())
  optional = REFERENCE_KEYS if header["format_version"] >= 2 else ()
  unknown = sorted(keys - set(expected) - set(optional))
  missing = [key for key in expected if key not in keys]
  if unknown:
    _bad(path, f"unknown key(s) {unknown}; expected {list(expected)}")
  if missing:
    _bad(path, f"missing key(s) {missing}; expected {list(expected)}")
  edges, loss, threshold, cost = check_arrays(
      header, arrays["edges"], arrays["loss"], arrays["threshold"], arrays["cost"], path)
  calibration = check_calibration(header, arrays.get("calibration"), path)
  reference = check_reference(header, *(arrays.get(key) for key in REFERENCE_KEYS), path)
  return header, edges, loss, threshold, cost, calibration, reference


def trace_sha256(traces: Traces) -> str:
  """sha256 hex digest of a trace's arrays, stable under save/load.

  Hashes, for each present field of `Traces` (conf, pred, label, cost,
  signal, head_cost, position), its name, shape and bytes in the dtype the
  trace file stores (float32 conf and signal, int64 pred, label and position,
  float64 cost and head_cost), so a trace and the same trace written and
  re-read with `jexit.save_traces`/`load_traces` hash alike.
  """
  if not isinstance(traces, Traces):
    raise ValueError(f"traces: expected jexit.Traces, got {type(traces).__name__}")
  dtypes = {"conf": np.float32, "pred": np.int64, "label": np.int64,
            "cost": np.float64, "signal": np.float32, "head_cost": np.float64,
            "position": np.int64}
  h = hashlib.sha256()
  for name in Traces._fields:
    a = getattr(traces, name)
    if a is None:
      continue
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
      raise ValueError(f"traces.{name}: expected real numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a.astype(dtypes[name]))
    h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _pick(name, a, index, axis_name):
  """`a[index]` with a ValueError naming the field when out of range."""
  size = a.shape[0]
  if not is_int_scalar(index):
    raise ValueError(f"{axis_name}: expected an int index, got {index!r}")
  if not -size <= index < size:
    raise ValueError(f"{axis_name}: expected an index in [0, {size}) into {name} "
                     f"(shape {a.shape}), got {index}")
  return a[index]


def policy_arrays(policy: Policy, binning: Binning, model: Optional[ExitModel],
                  lam_index: int, *, model_index: Optional[int] = None):
  """Selects one policy of a (batched) solve and checks it against its inputs.

  Args:
    policy: `Policy` with `threshold [L, K, S]` or `[M, L, K, S]`.
    binning: the `Binning` it was fitted with, `edges [K, S+1]` (or
      `[M, K, S+1]` per model).
    model: the `ExitModel` it was solved from (checked against `policy.loss`
      and `policy.cost`), or None.
    lam_index: which lam of the grid.
    model_index: which model of a batch; required iff the policy is batched.

  Returns:
    `(header fields dict, edges [K, S+1], loss [K, S], threshold [K, S], cost [K])`.
  """
  policy = check_policy(policy)
  if not isinstance(binning, Binning):
    raise ValueError(f"binning: expected jexit.Binning, got {type(binning).__name__}")
  threshold, lam, value, loss, cost = (policy.threshold, policy.lam, policy.value,
                                       policy.loss, policy.cost)
  edges = np.asarray(binning.edges)
  if edges.dtype.kind not in "iuf":
    raise ValueError(f"binning.edges: expected real numbers, got dtype {edges.dtype}")
  edges = edges.astype(np.float64)
  if threshold.ndim == 4:
    if model_index is None:
      raise ValueError(f"model_index: the policy holds a batch of {threshold.shape[0]} "
                       f"models (threshold shape {threshold.shape}); say which one")
    threshold = _pick("policy.threshold", threshold, model_index, "model_index")
    lam = _pick("policy.lam", lam, model_index, "model_index")
    value = _pick("policy.value", value, model_index, "model_index")
    loss = _pick("policy.loss", loss, model_index, "model_index")
    cost = _pick("policy.cost", cost, model_index, "model_index")
    if edges.ndim == 3:
      edges = _pick("binning.edges", edges, model_index, "model_index")
    if model is not None and np.ndim(model.loss) == 3:
      model = ExitModel(*(_pick(f"model.{f}", np.asarray(a), model_index, "model_index")
                          for f, a in zip(ExitModel._fields, model)))
  elif threshold.ndim == 3:
    if model_index is not None:
      raise ValueError(f"model_index: the policy is not batched over models "
                       f"(threshold shape {threshold.shape}), got {model_index}")
  l_count, k, s = threshold.shape
  if edges.shape != (k, s + 1):
    raise ValueError(f"binning.edges: expected shape [K, S+1] = ({k}, {s + 1}) to match "
                     f"the policy's K={k} ramps and S={s} bins, got {edges.shape}")
  entry = signals.get(binning.signal, "binning.signal")
  if entry.needs_calibration and (binning.calibration is None
                                  or not class_weights_ok(binning.calibration, k)):
    raise ValueError(f"binning.calibration: expected finite weights [K-1={k - 1}, 2C+3] "
                     f"for a 'class' binning, got shape {np.shape(binning.calibration)}")
  if model is not None:
    if not isinstance(model, ExitModel):
      raise ValueError(f"model: expected jexit.ExitModel, got {type(model).__name__}")
    m_loss = np.asarray(model.loss)
    for name, a in (("model.loss", m_loss), ("model.cost", np.asarray(model.cost))):
      if a.dtype.kind not in "iuf":
        raise ValueError(f"{name}: expected real numbers, got dtype {a.dtype}")
    if m_loss.shape != (k, s):
      raise ValueError(f"model.loss: expected shape [K, S] = ({k}, {s}) like the "
                       f"policy, got {m_loss.shape}")
    # The solver stores loss in its working dtype: compare in that dtype.
    if not np.array_equal(m_loss.astype(loss.dtype), loss):
      raise ValueError("model.loss: differs from policy.loss; the policy was not "
                       "solved from this model")
    if not np.allclose(np.asarray(model.cost, np.float64), cost.astype(np.float64),
                       rtol=1e-6, atol=0):
      raise ValueError(f"model.cost: {np.asarray(model.cost).tolist()} differs from "
                       f"policy.cost {cost.tolist()}")
  _pick("policy.lam", lam, lam_index, "lam_index")
  lam_index = int(lam_index) % l_count
  dtype = loss.dtype if loss.dtype in (np.float32, np.float64) else np.dtype(np.float64)
  cost64 = np.asarray(model.cost if model is not None else cost, np.float64)
  fields = {
      "signal": binning.signal,
      "lam": float(lam[lam_index]),
      "recall": bool(policy.recall),
      "num_ramps": int(k),
      "num_bins": int(s),
      "cost": [float(c) for c in cost64],
      "dtype": np.dtype(dtype).name,
      "value": float(value[lam_index]) if np.isfinite(value[lam_index]) else None,
      "lam_index": lam_index,
      "model_index": None if model_index is None else int(model_index),
  }
  return (fields, edges, loss.astype(dtype), threshold[lam_index].astype(dtype), cost64)


def export_policy(path, policy: Policy, binning: Binning, model: Optional[ExitModel],
                  lam_index: int, *, model_index: Optional[int] = None,
                  traces: Optional[Traces] = None,
                  trace_hash: Optional[str] = None,
                  budget: Optional[dict] = None,
                  certificate: Optional[dict] = None,
                  active_ramps=None,
                  reference=None) -> dict:
  """Writes one policy of a solve to a self-describing `.npz` (format version 2).

  The file holds `edges [K, S+1]`, `loss [K, S]`, `threshold [K, S]`,
  `cost [K]` (and, for a "class" signal, its weights `calibration
  [K-1, 2C+3]`) and a JSON `header` (format name and version, jexit version,
  binned signal, lam, recall, K, S, costs, dtype, sha256 of the fit trace).
  Everything is validated with the same checks the loader applies before the
  file is written (atomically, via a temporary file and a rename).

  Args:
    path: where to write (any name; `.npz` is conventional).
    policy: from `jexit.solve`, `threshold [L, K, S]` or `[M, L, K, S]`.
    binning: the `Binning` from `jexit.fit` for the same model.
    model: the `ExitModel` the policy was solved from (checked), or None.
    lam_index: which lam of `policy.lam` to export.
    model_index: which model, when the policy is batched over models.
    traces: the fit trace; its `trace_sha256` goes into the header.
    trace_hash: the hash itself, if the trace is not at hand.
    budget: `{"max_loss", "metric"}` the table was chosen for.
    certificate: the certificate of a certified budget (a JSON-ready dict).
    active_ramps: the candidate ramps the table's K ramps are (placement).
    reference: `(occupancy [K, S], stops [K], num_inputs)`, the fit rows'
      counts that deployment monitoring compares live counts with.

  Returns:
    The header written (a dict).

  Examples:
    >>> model, binning = jexit.fit(traces)                       # doctest: +SKIP
    >>> policy = jexit.solve(model, np.array([0.1, 1.0]))       # doctest: +SKIP
    >>> export_policy("policy.npz", policy, binning, model, 0, traces=traces)  # doctest: +SKIP
  """
  if traces is not None and trace_hash is not None:
    raise ValueError("traces, trace_hash: pass one of them, not both")
  digest = trace_sha256(traces) if traces is not None else trace_hash
  if digest is not None and not isinstance(digest, str):
    raise ValueError(f"trace_hash: expected a sha256 hex string, got {type(digest).__name__}")
  fields, edges, loss, threshold, cost = policy_arrays(
      policy, binning, model, lam_index, model_index=model_index)
  import jexit  # at call time: the package is fully imported by then
  header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "jexit_version": str(getattr(jexit, "__version__", "unknown")),
            "trace_sha256": digest, **fields}
  for name, value in (("budget", budget), ("certificate", certificate),
                      ("active_ramps", None if active_ramps is None
                       else [int(a) for a in active_ramps])):
    if value is not None:
      header[name] = value
  if reference is not None:
    header["reference_inputs"] = int(reference[2])
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"path: expected a policy file to write, got the folder {path}")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise ValueError(f"path: the folder {folder} of {path} does not exist")
  check_header(header, path)
  edges, loss, threshold, cost = check_arrays(header, edges, loss, threshold, cost, path)
  calibration = check_calibration(
      header, (np.asarray(binning.calibration, np.float64)
               if signals.get(binning.signal).needs_calibration else None),
      path)
  extra = {} if calibration is None else {"calibration": calibration}
  if reference is not None:
    occupancy, stops, _ = check_reference(header, reference[0], reference[1], path)
    extra.update(reference_occupancy=occupancy, reference_stops=stops)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      np.savez_compressed(f, header=np.array(json.dumps(header, sort_keys=True)),
                          edges=edges, loss=loss, threshold=threshold, cost=cost, **extra)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return header


def add_reference(path, traces: Traces) -> dict:
  """Stores the reference of deployment monitoring in a policy file.

  Replays the file's table on `traces` (its rows are the past law the live
  counts are compared with; out-of-range signals use the end bins) with
  counters on, and rewrites the file (atomically) with the counts:
  `reference_occupancy [K, S]`, `reference_stops [K]` and
  `header.reference_inputs`. The runtimes load and ignore them;
  `jexit monitor` reads them (docs/monitor.md).

  Returns:
    The header written (a dict).
  """
  from jexit.runtime import ExitTable  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  table = ExitTable.load(path, out_of_range="clip", counters=True)
  custom = not signals.REGISTRY[table.signal].from_outputs
  if custom and traces.signal is None:
    raise ValueError("traces.signal: this table bins a custom signal; the traces have none")
  table.run(traces.conf, traces.pred, signal=traces.signal if custom else None)
  c = table.counters
  header, edges, loss, threshold, cost, calibration, _ = read_policy_arrays(path)
  header["reference_inputs"] = int(c.num_inputs)
  occupancy, stops, _ = check_reference(header, c.occupancy, c.stop_hist, path)
  extra = {} if calibration is None else {"calibration": calibration}
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      np.savez_compressed(f, header=np.array(json.dumps(header, sort_keys=True)),
                          edges=edges, loss=loss, threshold=threshold, cost=cost,
                          reference_occupancy=occupancy, reference_stops=stops, **extra)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return header


def load_policy_file(path, **options):
  """Reads and validates a policy file into a `jexit.runtime.ExitTable`
  (no pickle, no JAX); `options` as in `ExitTable`."""
  from jexit.runtime import ExitTable  # pylint: disable=import-outside-toplevel
  return ExitTable.load(path, **options)
