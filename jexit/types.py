"""Containers shared by every part of jexit.

Shape legend: N inputs, K ramps, S bins, X distinct loss values, L lam values,
M models. A leading `...` is an optional batch of models `[M]`.
"""

from typing import NamedTuple, Optional

import numpy as np


def is_real_scalar(v) -> bool:
  """A Python or numpy int or float (not a bool: `True + 1` should not pass)."""
  return (isinstance(v, (int, float, np.integer, np.floating))
          and not isinstance(v, (bool, np.bool_)))


def is_int_scalar(v) -> bool:
  """A Python or numpy integer (not a bool)."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_bool_like(v) -> bool:
  """A bool, or the integer 0 or 1."""
  return isinstance(v, (bool, np.bool_)) or (is_int_scalar(v) and v in (0, 1))


class Traces(NamedTuple):
  """What every ramp of an early-exit network said on N inputs (PROBLEM.md).

  Attributes:
    conf: `[N, K]` max-softmax confidence of each ramp, in [0, 1].
    pred: `[N, K]` int, predicted class of each ramp.
    label: `[N]` int ground truth, or None.
    cost: `[K]` cost `c_k >= 0` of backbone segment k plus its ramp head.
    signal: `[N, K]` another exit signal (lower = more confident), or None
      for the default `1 - conf`.
    head_cost: `[K]` the part of `cost[k]` spent in ramp k's head (the rest
      is backbone segment k), or None. Ramp placement needs it.
    position: `[K]` int, nondecreasing: the backbone position of each ramp,
      when several candidate heads sit at one position (they share its
      segment: a ramp at the same position as the previous one has no
      segment of its own, `cost[k] == head_cost[k]`), or None (one ramp per
      position).
  """
  conf: np.ndarray    # [N, K]
  pred: np.ndarray    # [N, K]
  label: Optional[np.ndarray]  # [N]
  cost: np.ndarray    # [K]
  signal: Optional[np.ndarray] = None  # [N, K]
  head_cost: Optional[np.ndarray] = None  # [K]
  position: Optional[np.ndarray] = None  # [K]

  @property
  def num_inputs(self) -> int:
    return int(np.shape(self.conf)[0])

  @property
  def num_ramps(self) -> int:
    return int(np.shape(self.conf)[1])

  def exit_signal(self) -> np.ndarray:
    """`[N, K]` the signal the policy bins: `signal`, or `1 - conf`."""
    if self.signal is not None:
      return np.asarray(self.signal, np.float64)
    return 1.0 - np.asarray(self.conf, np.float64)

  def take(self, rows) -> "Traces":
    """The traces of a subset of inputs (a fit or test split)."""
    rows = np.asarray(rows)
    pick = lambda a: None if a is None else np.asarray(a)[rows]
    return self._replace(conf=pick(self.conf), pred=pick(self.pred),
                         label=pick(self.label), cost=np.asarray(self.cost),
                         signal=pick(self.signal))


class ExitModel(NamedTuple):
  """Discrete Markov model of the binned exit signal (PROBLEM.md).

  Every field may carry a leading `[M]` batch of models.

  Attributes:
    init: `[S]` law of the bin at ramp 1.
    trans: `[K-1, S, S]` with `trans[k, a, b] = Pr(bin b at ramp k+1 | bin a
      at ramp k)`; or state-conditioned `[K-1, X, S, S]`, where `X` indexes the
      sorted distinct values of `loss` (the best loss so far). Recall only.
    loss: `[K, S]` loss paid if the output is ramp k's prediction from bin s.
    cost: `[K]` cost of each segment.
  """
  init: np.ndarray   # [S]
  trans: np.ndarray  # [K-1, S, S] or [K-1, X, S, S]
  loss: np.ndarray   # [K, S]
  cost: np.ndarray   # [K]


class Binning(NamedTuple):
  """Per-ramp bin edges of the exit signal.

  Bin of value v at ramp k: the number of inner edges `edges[k, 1:-1]` that
  are <= v (so bins are `[e_s, e_{s+1})`, the last one closed). Values outside
  `[edges[k, 0], edges[k, -1]]` fall into the end bins.

  Attributes:
    edges: `[K, S+1]` increasing edges per ramp.
    signal: which signal is binned: `"1-conf"`, `"stability"` (`1 - conf`
      plus 1 where the prediction changed since the previous ramp,
      `jexit.runtime.stability_signal`), `"class"`
      (`jexit.runtime.class_signal` with `calibration`) or `"signal"`
      (`Traces.signal`).
    calibration: `[K-1, 2C+3]` weights of the `"class"` signal (None for
      the others).
  """
  edges: np.ndarray  # [K, S+1]
  signal: str = "1-conf"
  calibration: Optional[np.ndarray] = None  # [K-1, 2C+3]

  @property
  def num_bins(self) -> int:
    return int(np.shape(self.edges)[-1]) - 1

  def assign(self, values: np.ndarray) -> np.ndarray:
    """`[N, K]` int bins of `[N, K]` signal values (numpy)."""
    values = np.asarray(values, np.float64)
    edges = np.asarray(self.edges, np.float64)
    out = np.empty(values.shape, np.int32)
    for k in range(values.shape[1]):
      out[:, k] = np.searchsorted(edges[k, 1:-1], values[:, k], side="right")
    return out


class Policy(NamedTuple):
  """Exit policies for a batch of lam values (and optionally of models).

  Decision rule at ramp k in bin s, with `x` the best loss so far (recall) or
  the current loss `loss[k, s]` (no recall): stop iff `x <= threshold[k, s]`.
  Threshold entries are values of `loss` or +-inf (`+inf` at the last ramp,
  `-inf` where stopping is never optimal), so the comparison is exact.

  Attributes:
    threshold: `[..., L, K, S]` stop thresholds.
    value: `[..., L]` expected objective `loss + lam * cost` from the start.
    lam: `[..., L]` the cost weights.
    loss: `[..., K, S]` the loss table the thresholds compare against.
    cost: `[..., K]` the segment costs.
    recall: whether the output is the best ramp so far (True) or the current.
    stop: optional `[..., L, K, X, S]` full decision table (recall only,
      `solve(..., return_stop=True)`); X indexes `grid`.
    grid: optional `[..., X]` sorted distinct loss values (padded with the
      largest) that `stop` is indexed by.
  """
  threshold: np.ndarray  # [..., L, K, S]
  value: np.ndarray      # [..., L]
  lam: np.ndarray        # [..., L]
  loss: np.ndarray       # [..., K, S]
  cost: np.ndarray       # [..., K]
  recall: bool = True
  stop: Optional[np.ndarray] = None  # [..., L, K, X, S]
  grid: Optional[np.ndarray] = None  # [..., X]


def _real_field(name, a) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype.kind not in "iuf":
    raise ValueError(f"{name}: expected real numbers, got dtype {a.dtype}")
  return a


def check_policy(policy: Policy) -> Policy:
  """Validates a `Policy`, one `[L, K, S]` or a batch `[M, L, K, S]`; the one
  place its shapes and values are checked (evaluation, export, plots).

  Returns:
    The policy with numpy arrays (dtypes kept: thresholds compare exactly in
    the loss table's dtype).

  Raises:
    ValueError: naming the field, the expected shape or values and what came.
  """
  if not isinstance(policy, Policy):
    raise ValueError(f"policy: expected jexit.Policy, got {type(policy).__name__}")
  threshold = _real_field("policy.threshold", policy.threshold)
  if threshold.ndim not in (3, 4):
    raise ValueError(f"policy.threshold: expected shape [L, K, S] or [M, L, K, S], "
                     f"got {threshold.shape}")
  lead, (l_count, k, s) = threshold.shape[:-3], threshold.shape[-3:]
  loss = _real_field("policy.loss", policy.loss)
  lam = _real_field("policy.lam", policy.lam)
  value = _real_field("policy.value", policy.value)
  cost = _real_field("policy.cost", policy.cost)
  if loss.shape != lead + (k, s):
    raise ValueError(f"policy.loss: expected shape {lead + (k, s)} (from policy.threshold "
                     f"{threshold.shape}), got {loss.shape}")
  for name, a in (("lam", lam), ("value", value)):
    if a.shape != lead + (l_count,):
      raise ValueError(f"policy.{name}: expected shape {lead + (l_count,)} (from "
                       f"policy.threshold {threshold.shape}), got {a.shape}")
  if cost.shape != lead + (k,):
    raise ValueError(f"policy.cost: expected shape {lead + (k,)} (from policy.threshold "
                     f"{threshold.shape}), got {cost.shape}")
  if not is_bool_like(policy.recall):
    raise ValueError(f"policy.recall: expected a bool, got {policy.recall!r}")
  if np.any(np.isnan(threshold)) or not np.all(np.isfinite(loss)):
    raise ValueError("policy.threshold, policy.loss: expected no NaN (thresholds may "
                     "be +-inf; losses finite)")
  if not (np.all(np.isfinite(lam)) and np.all(lam >= 0)):
    raise ValueError(f"policy.lam: expected finite values >= 0, got "
                     f"{lam[~(np.isfinite(lam) & (lam >= 0))][:5].tolist()}")
  if not (np.all(np.isfinite(cost)) and np.all(cost >= 0)):
    raise ValueError(f"policy.cost: expected finite values >= 0, got {cost.tolist()}")
  return policy._replace(threshold=threshold, value=value, lam=lam, loss=loss, cost=cost,
                         recall=bool(policy.recall))
