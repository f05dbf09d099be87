"""The policy file: its format, its checks, and reading it (numpy only).

A policy file (format `jexit-policy`, version 2; version 1 is read too) is a
`.npz` of plain arrays, read with `allow_pickle=False`:

| key         | shape      | dtype             | meaning |
|-------------|------------|-------------------|---------|
| `header`    | `[]`       | unicode           | JSON object, see `HEADER_FIELDS` |
| `edges`     | `[K, S+1]` | float64           | per-ramp bin edges of the exit signal |
| `loss`      | `[K, S]`   | float32 / float64 | `l_k(s)`, the loss of outputting ramp k from bin s |
| `threshold` | `[K, S]`   | same as `loss`    | stop thresholds: values of `loss` or +-inf |
| `cost`      | `[K]`      | float64           | `c_k`, cost of segment k plus its head |
| `calibration` | `[K-1, 2C+3]` | float64        | only for `"class"`: the weights of `class_signal` |
| `reference_occupancy` | `[K, S]` | int64   | optional: the fit rows' bin counts (monitoring) |
| `reference_stops` | `[K]`  | int64             | optional: the fit rows' stops per ramp |

`header.signal` names an entry of `jexit.signals.REGISTRY`. `jexit.export`
writes the file; the same checks run when it is written and when it is read
(never with pickle). This module imports numpy only: the runtimes read policy
files through it.
"""

import json
import os
import re

import numpy as np

from jexit import signals
from jexit.npzio import read_npz

__all__ = ["budget_note", "check_arrays", "check_calibration", "check_certificate",
           "check_header", "check_reference", "describe_budget", "read_policy_arrays"]

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


def budget_note(header: dict) -> str:
  """The header's budget and certificate in short, as `ExitTable`'s repr ends
  (`""` without a budget or certificate)."""
  budget, cert = header.get("budget"), header.get("certificate")
  note = ""
  if budget is not None:
    note += f", budget={budget['max_loss']:g} {budget['metric']}"
  if cert is not None:
    note += (f", certified: Pr({cert['quantity']} > {cert['eps']:g}) <= {cert['delta']:g}"
             if cert["certified"] else ", not certified: backbone")
  elif budget is not None:
    note += ", not certified: fit rows only"
  return note


def describe_budget(header: dict) -> list:
  """What a checked header's budget, certificate and placement guarantee, in
  words: one line each (`ExitTable.describe`)."""
  budget, cert = header.get("budget"), header.get("certificate")
  lines = []
  if budget is None:
    lines.append("budget: none recorded (exported for a lam, or by an older jexit)")
  else:
    lines.append(f"budget: {budget['metric']} loss <= {budget['max_loss']:g}")
  if cert is None:
    if budget is not None:
      lines.append("not certified: the budget was met on the fit rows only; on new inputs "
                   "it is exceeded in about half of all splits (docs/certify.md)")
  elif cert["certified"]:
    units = (f"{cert['units']} rows" if cert["block"] == 1
             else f"{cert['units']} blocks of {cert['block']} rows")
    lines.append(
        f"certified: Pr(true {cert['quantity']} > {cert['eps']:g}) <= {cert['delta']:g} "
        f"({cert['test']} test on {units} that the fit never saw, sha256 "
        f"{(cert['rows_sha256'] or '-')[:12]}; observed {cert['loss']:.4g}, upper bound "
        f"{cert['ucb']:.4g}, p-value {cert['pvalue']:.3g})")
  else:
    lines.append(
        f"not certified: {cert['units']} calibration units could not certify "
        f"{cert['eps']:g} at delta {cert['delta']:g} (it needs {cert['needed_units']}; they "
        f"certify at best {cert['smallest_certifiable']:.4g}): this is the backbone, it "
        f"never exits early")
  if header.get("active_ramps") is not None:
    lines.append(f"active ramps: {header['active_ramps']}")
  return lines
