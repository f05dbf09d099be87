"""Writes one solved exit policy as a policy file, and its monitoring reference.

The format, its checks and the reader are `jexit.policy_file`; this module
selects one policy of a solve, checks it against its model, and writes it
(atomically). This module imports numpy only.
"""

import hashlib
import json
import os
from typing import Optional

import numpy as np

from jexit import signals
from jexit.policy_file import (FORMAT_NAME, FORMAT_VERSION, check_arrays, check_calibration,
                               check_header, check_reference, read_policy_arrays)
from jexit.signals import class_weights_ok
from jexit.types import Binning, ExitModel, Policy, Traces, check_policy, is_int_scalar

__all__ = ["add_reference", "export_placement", "export_policy", "load_policy_file",
           "read_policy_arrays", "trace_sha256"]


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


def export_placement(path, res, budget, traces: Traces) -> dict:
  """Writes the chosen subset's table of `budget` (a `jexit.place.BudgetPlacement`
  of `res`, a `jexit.place.Placement`): `export_policy`, its header listing
  `active_ramps`, then `add_reference` on `traces`, the candidate trace (the
  table reads its active columns), so `jexit monitor` can watch it.

  Returns:
    The header written (a dict).
  """
  from jexit.report import certificate_to_dict  # pylint: disable=import-outside-toplevel
  e = budget.placed
  if e is None:
    raise ValueError(f"max_loss: nothing met the budget {budget.max_loss:g} on the fit rows; "
                     f"no table to write")
  i = e["subset_index"]
  export_policy(path, res.policies[i], res.binnings[i], res.models[i], e["lam_index"],
                traces=traces, budget={"max_loss": budget.max_loss, "metric": "agreement"},
                certificate=certificate_to_dict(budget.certificate, method="placement"),
                active_ramps=e["active_ramps"])
  return add_reference(path, traces)


def load_policy_file(path, **options):
  """Reads and validates a policy file into a `jexit.runtime.ExitTable`
  (no pickle, no JAX); `options` as in `ExitTable`."""
  from jexit.runtime import ExitTable  # pylint: disable=import-outside-toplevel
  return ExitTable.load(path, **options)
