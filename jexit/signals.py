"""The exit signals: the one place that knows what each is and how to compute it.

A ramp's exit signal is the number the policy bins (lower = more confident).
Two kinds:

- **Binned signals** (`NAMES`), the ones a `Binning` and a policy file carry:
  `"1-conf"` (`1 - max softmax`), `"stability"` (`1 - max softmax`, plus 1
  where the ramp's prediction differs from the previous ramp's: what
  patience/PABEE uses), `"class"` (one minus a per-class logistic estimate
  that the ramp agrees with the final one; weights in `calibration`) and
  `"signal"` (the traces' own recorded signal, which a server computes as it
  was recorded).
- **Recorded signals** (`RECORDED`), computed from a ramp's softmax when a
  trace is recorded and stored in its `signal` field: `"margin"` and
  `"entropy"`.

Every function here is numpy; the per-ramp ones take an array namespace `xp`
(numpy or torch) so that the torch runtime computes the same values with the
same operations on the input's device. This module imports nothing from jexit.
"""

from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np

CLASS_LOG_FLOOR = 1e-9  # log(1 - conf) is floored at log(1e-9) for conf = 1


class Signal(NamedTuple):
  """One binned exit signal.

  Attributes:
    name: what a `Binning` and a policy header call it.
    range: `(lo, hi)` every value lies in, or None (the trace's own signal:
      its range comes from the fit rows or `fit(..., signal_range=)`).
    from_outputs: computed from each ramp's max softmax and prediction (else
      the caller supplies the values).
    uses_previous: reads the previous ramp's prediction.
    needs_calibration: needs the `[K-1, 2C+3]` weights of the class signal.
    ramp: `(k, conf_k, pred_k, prev_pred_k, calibration, xp) -> [...]` the
      values at ramp k (0-based; `prev_pred_k` None at k = 0), or None.
    one: `(k, conf, pred, prev_pred, weights) -> float`, the same value for
      one input in Python floats (`weights`: `calibration.tolist()`), or None.
    help: one line for users.
  """
  name: str
  range: Optional[Tuple[float, float]]
  from_outputs: bool
  uses_previous: bool
  needs_calibration: bool
  ramp: Optional[Callable]
  one: Optional[Callable]
  help: str


# --------------------------------------------------------- per-ramp formulas

def _one_minus_conf(k, conf_k, pred_k, prev_pred_k, calibration, xp=np):
  del k, pred_k, prev_pred_k, calibration
  return 1.0 - conf_k


def _stability(k, conf_k, pred_k, prev_pred_k, calibration, xp=np):
  del calibration, xp
  if k == 0 or prev_pred_k is None:
    return 1.0 - conf_k + 0.0
  return (1.0 - conf_k) + (pred_k != prev_pred_k)


def class_log_err(conf_k, xp=np):
  """`log(1 - conf)`, floored at `log(CLASS_LOG_FLOOR)`: the "class" signal's
  confidence feature."""
  if xp is np:
    conf_k = np.asarray(conf_k, np.float64)
  return xp.log(xp.clip(1.0 - conf_k, CLASS_LOG_FLOOR, None))


def class_logit(w, pred_k, log_err, same, xp=np):
  """`class_features(...) @ w` without the one-hot matrix, O(N) for any C:
  `w[c] + w[C + c] * log_err` (for a class c in [0, C); 0 otherwise)
  `+ w[2C] * log_err + w[2C + 1] * same + w[2C + 2]`."""
  num_classes = (len(w) - 3) // 2
  if xp is np:
    pred_k = np.asarray(pred_k).astype(np.int64)
  seen = (pred_k >= 0) & (pred_k < num_classes)
  c = xp.where(seen, pred_k, 0)
  return (xp.where(seen, w[c] + w[num_classes + c] * log_err, 0.0)
          + w[2 * num_classes] * log_err + w[2 * num_classes + 1] * same
          + w[2 * num_classes + 2])


def _class(k, conf_k, pred_k, prev_pred_k, calibration, xp=np):
  if xp is np:
    calibration = np.asarray(calibration, np.float64)
    conf_k = np.asarray(conf_k, np.float64)
  if k == calibration.shape[0]:
    return 1.0 - conf_k
  if prev_pred_k is None:
    same = 0.0
  else:
    same = pred_k == prev_pred_k
    same = np.asarray(same) if xp is np else same.to(calibration.dtype)
  z = class_logit(calibration[k], pred_k, class_log_err(conf_k, xp), same, xp)
  return xp.exp(-xp.logaddexp(xp.zeros_like(z), z))  # 1 - sigmoid(z), stable for large |z|


# One input in Python floats (the batch-size-1 path of the runtimes): the same
# operations in the same order as the array formulas, with numpy's log and exp,
# so each value is bit-for-bit the array path's.

def _one_minus_conf_one(k, conf, pred, prev_pred, weights):
  return 1.0 - conf


def _stability_one(k, conf, pred, prev_pred, weights):
  return (1.0 - conf) + (0.0 if k == 0 else float(prev_pred is None or pred != prev_pred))


def _class_one(k, conf, pred, prev_pred, weights):
  if k == len(weights):
    return 1.0 - conf
  w, c = weights[k], (len(weights[k]) - 3) // 2
  same = prev_pred is not None and pred == prev_pred
  log_err = float(np.log(max(1.0 - conf, CLASS_LOG_FLOOR)))
  z = (w[pred] + w[c + pred] * log_err) if 0 <= pred < c else 0.0
  z = z + w[2 * c] * log_err + w[2 * c + 1] * float(same) + w[2 * c + 2]
  return float(np.exp(-np.logaddexp(0.0, z)))


REGISTRY = {s.name: s for s in (
    Signal("1-conf", (0.0, 1.0), True, False, False, _one_minus_conf, _one_minus_conf_one,
           "1 - max softmax (the default)"),
    Signal("stability", (0.0, 2.0), True, True, False, _stability, _stability_one,
           "1 - max softmax, plus 1 where the prediction changed since the previous ramp"),
    Signal("class", (0.0, 1.0), True, True, True, _class, _class_one,
           "1 - a per-class logistic estimate, fitted on the fit rows, that the ramp "
           "agrees with the final one"),
    Signal("signal", None, False, False, False, None, None,
           "the trace's own recorded signal (margin, entropy, a learned gate, ...)"),
)}
NAMES = tuple(REGISTRY)
# The signals `jexit.choose(signal="auto")` scores besides the traces' own, in
# the order that breaks ties (experiments/reports/SELECT_FAMILY.md, CLASS.md).
AUTO = ("stability", "class")


def get(name, field: str = "signal") -> Signal:
  """The registry entry of `name`, or a ValueError naming `field`."""
  if not isinstance(name, str) or name not in REGISTRY:
    raise ValueError(f"{field}: expected one of {list(NAMES)}, got {name!r}")
  return REGISTRY[name]


def own(has_signal: bool) -> str:
  """The traces' own signal: `"signal"` if they record one, else `"1-conf"`."""
  return "signal" if has_signal else "1-conf"


def class_weights_ok(calibration, num_ramps: int) -> bool:
  """Whether `calibration` is finite real weights `[K-1, 2C+3]` of the "class"
  signal for a table or traces of `num_ramps` = K ramps."""
  a = np.asarray(calibration)
  return (a.ndim == 2 and a.shape[0] == num_ramps - 1 and a.shape[1] >= 3
          and a.shape[1] % 2 == 1 and a.dtype.kind in "iuf" and bool(np.all(np.isfinite(a))))


def ramp_values(name: str, k: int, conf_k, pred_k=None, prev_pred_k=None,
                calibration=None, xp=np):
  """`[...]` the signal `name` at ramp k (0-based) from its max softmax
  `conf_k [...]`, its predictions `pred_k` and ramp k-1's `prev_pred_k` (None
  at k = 0), in namespace `xp` (numpy or torch)."""
  entry = get(name)
  if entry.ramp is None:
    raise ValueError(f"signal: {name!r} is the caller's own signal; compute it as the "
                     f"traces recorded it")
  return entry.ramp(k, conf_k, pred_k, prev_pred_k, calibration, xp)


def values(name: str, conf, pred, *, signal=None, calibration=None,
           field: str = "signal") -> np.ndarray:
  """`[N, K]` float64 values of the binned signal `name`.

  Args:
    name: one of `NAMES`.
    conf: `[N, K]` max softmax. pred: `[N, K]` int predictions.
    signal: `[N, K]` the trace's own signal (for `"signal"`).
    calibration: `[K-1, 2C+3]` weights (for `"class"`).
    field: the argument named in errors.
  """
  entry = get(name, field)
  if entry.ramp is None:
    if signal is None:
      raise ValueError(f"{field}: 'signal' bins traces.signal, but the traces have none")
    return np.asarray(signal, np.float64)
  conf = np.asarray(conf, np.float64)
  k_count = conf.shape[-1]
  if entry.needs_calibration and (calibration is None
                                  or not class_weights_ok(calibration, k_count)):
    cal = None if calibration is None else np.asarray(calibration)
    raise ValueError(f"{field}: {name!r} needs finite weights calibration [K-1={k_count - 1}, "
                     f"2C+3] (from jexit.fit), got "
                     f"{None if cal is None else (cal.shape, str(cal.dtype))}")
  if name == "1-conf":  # the common case, one array operation
    return 1.0 - conf
  pred = np.asarray(pred)
  return np.stack([np.asarray(entry.ramp(k, conf[..., k], pred[..., k],
                                         None if k == 0 else pred[..., k - 1],
                                         calibration), np.float64)
                   for k in range(k_count)], axis=-1)


def stability_signal(conf, pred) -> np.ndarray:
  """`[..., K]` float64 "stability" signal from confidences and predictions.

  `(1 - conf[..., k]) + 1` where `pred[..., k] != pred[..., k-1]`, else
  `1 - conf[..., k]` (always at k = 0): a ramp that changed its mind is less
  trusted than any ramp that agrees with its predecessor. Values in [0, 2].
  """
  return values("stability", conf, pred)


def class_signal_k(k: int, conf_k, pred_k, prev_pred_k, calibration) -> np.ndarray:
  """`[...]` "class" signal of ramp k (0-based): `1 - sigmoid(features . w_k)`
  for k < K-1 (`calibration [K-1, 2C+3]` holds the w_k), `1 - conf` at the last
  ramp. See `class_signal`."""
  return _class(k, conf_k, pred_k, prev_pred_k, calibration)


def class_signal(conf, pred, calibration) -> np.ndarray:
  """`[N, K]` float64 "class" signal of confidences and predictions `[N, K]`.

  At ramp k < K-1: one minus the probability, from a logistic fit
  (`jexit.fit.fit_class_calibration`), that ramp k's prediction agrees with
  the final ramp's, given its confidence, its predicted class and whether it
  agrees with the previous ramp (`class_features`). A ramp's confidence means
  different things for different predicted classes; experiments/reports/CLASS.md
  measured what that is worth. At the last ramp: `1 - conf`. Values in [0, 1].
  """
  conf = np.asarray(conf, np.float64)
  pred = np.asarray(pred)
  return np.stack([_class(k, conf[..., k], pred[..., k],
                          None if k == 0 else pred[..., k - 1], calibration)
                   for k in range(conf.shape[-1])], axis=-1)


def class_features(conf_k, pred_k, prev_pred_k, num_classes: int) -> np.ndarray:
  """`[..., 2C+3]` features of ramp k for the "class" signal: one-hot of the
  predicted class (all zero for a class id outside [0, C)), the same one-hot
  times `log(1 - conf)`, `log(1 - conf)`, 1 where the prediction equals the
  previous ramp's (0 at the first ramp: pass None), and 1 (intercept)."""
  conf_k = np.asarray(conf_k, np.float64)
  pred_k = np.asarray(pred_k).astype(np.int64)
  log_err = class_log_err(conf_k)
  onehot = (pred_k[..., None] == np.arange(num_classes)).astype(np.float64)
  same = (np.zeros(conf_k.shape) if prev_pred_k is None
          else (pred_k == np.asarray(prev_pred_k)).astype(np.float64))
  return np.concatenate([onehot, onehot * log_err[..., None], log_err[..., None],
                         same[..., None], np.ones(conf_k.shape + (1,))], axis=-1)


# ---------------------------------------------- signals recorded from a softmax

def margin(probs, xp=np):
  """`[...]` margin signal of softmax outputs `probs [..., C]`:
  `1 - (top probability - second)`, in [0, 1], small when sure."""
  if xp is np:
    probs = np.asarray(probs, np.float64)
    top2 = -np.partition(-probs, 1, axis=-1)[..., :2]
  else:
    top2 = probs.topk(2, dim=-1).values
  return xp.clip(1.0 - (top2[..., 0] - top2[..., 1]), 0.0, 1.0)


def entropy(probs, xp=np):
  """`[...]` normalised entropy of softmax outputs `probs [..., C]`:
  `-sum p log p / log C`, in [0, 1], small when sure."""
  if xp is np:
    probs = np.asarray(probs, np.float64)
  logs = xp.log(xp.clip(probs, 1e-30, None))
  return xp.clip(-(probs * logs).sum(-1) / float(np.log(probs.shape[-1])), 0.0, 1.0)


def margin_signal(probs) -> np.ndarray:
  """`[...]` float64 margin signal of softmax outputs `probs [..., C]`:
  `1 - (top probability - second)`, in [0, 1], small when sure. A custom
  `signal` (record it in the traces' `signal`, fit with `signal_range=(0, 1)`,
  serve with `signal=`); experiments/reports/MARGIN.md measured it."""
  probs = np.asarray(probs, np.float64)
  if probs.ndim < 1 or probs.shape[-1] < 2:
    raise ValueError(f"probs: expected softmax outputs [..., C] with C >= 2 classes, "
                     f"got shape {probs.shape}")
  return margin(probs)


# name -> (range, function of softmax outputs [..., C] and xp)
RECORDED = {"margin": ((0.0, 1.0), margin), "entropy": ((0.0, 1.0), entropy)}
