"""What a batch of exit policies did on a trace: `Evaluation` and its metrics (numpy).

Every method scores into the same `Evaluation` (PROBLEM.md, "Metrics"):
`jexit.evaluation.evaluate` from the counts of its replay (`from_counts`), the
baselines from their per-input decisions (`summarize`). Nothing here imports JAX.
"""

from typing import NamedTuple, Optional, Sequence

import numpy as np

from jexit.traces import check_traces
from jexit.types import Traces

__all__ = ["Evaluation", "QUANTILES", "cost_quantiles", "from_counts", "select", "summarize"]

QUANTILES = (0.50, 0.95, 0.99)


class Evaluation(NamedTuple):
  """What a batch of exit policies did on a trace (PROBLEM.md, "Metrics").

  `[..., L]` is the policy batch (`[M, L]` models x lam values for `evaluate`,
  `[P]` parameter values for a baseline). Histograms are fractions of inputs.

  Attributes:
    param: `[..., L]` lam, or the baseline's parameter.
    agreement: `[..., L]` fraction whose output equals the final ramp's pred.
    accuracy: `[..., L]` fraction whose output equals the label; None when
      the traces have no labels.
    mean_cost: `[..., L]` mean cost of the ramps run per input.
    speedup: `[..., L]` `sum(cost) / mean_cost`.
    stop_hist: `[..., L, K]` fraction of inputs that stopped at ramp k.
    output_hist: `[..., L, K]` fraction whose output is ramp k's prediction
      (differs from `stop_hist` only with recall).
    p50_cost, p95_cost, p99_cost: `[..., L]` per-input cost quantiles (the
      inverted-CDF quantile: an actual per-input cost, as numpy's
      `method="inverted_cdf"`).
    objective: `[..., L]` mean of `loss[output ramp, its bin] + lam * cost`
      with the policy's own loss table; None for baselines (no loss table).
    num_inputs: N, the number of inputs replayed.
    stop_ramp: `[..., L, N]` int ramp where each input stopped, or None.
    output_ramp: `[..., L, N]` int ramp whose prediction is output, or None.
  """
  param: np.ndarray          # [..., L]
  agreement: np.ndarray      # [..., L]
  accuracy: Optional[np.ndarray]  # [..., L]
  mean_cost: np.ndarray      # [..., L]
  speedup: np.ndarray        # [..., L]
  stop_hist: np.ndarray      # [..., L, K]
  output_hist: np.ndarray    # [..., L, K]
  p50_cost: np.ndarray       # [..., L]
  p95_cost: np.ndarray       # [..., L]
  p99_cost: np.ndarray       # [..., L]
  objective: Optional[np.ndarray]  # [..., L]
  num_inputs: int
  stop_ramp: Optional[np.ndarray] = None    # [..., L, N]
  output_ramp: Optional[np.ndarray] = None  # [..., L, N]


_PER_POLICY = ("param", "agreement", "accuracy", "mean_cost", "speedup", "stop_hist",
               "output_hist", "p50_cost", "p95_cost", "p99_cost", "objective",
               "stop_ramp", "output_ramp")


def select(evaluation: Evaluation, index) -> Evaluation:
  """The evaluation of a subset of a flat `[P]` policy batch (numpy index)."""
  return evaluation._replace(**{
      f: None if getattr(evaluation, f) is None else np.asarray(getattr(evaluation, f))[index]
      for f in _PER_POLICY})


def cost_quantiles(stop_count: np.ndarray, cost: np.ndarray,
                   quantiles: Sequence[float] = QUANTILES) -> np.ndarray:
  """`[..., Q]` inverted-CDF quantiles of per-input cost from stop counts `[..., K]`.

  An input that stops at ramp k costs `cost[0] + ... + cost[k]`, which is
  nondecreasing in k, so the q-quantile is the cost of the first ramp whose
  cumulative count reaches `q * N`.
  """
  stop_count = np.asarray(stop_count, np.float64)
  ramp_cost = np.cumsum(np.asarray(cost, np.float64))
  cum = np.cumsum(stop_count, axis=-1)
  n = cum[..., -1:]
  out = []
  for q in quantiles:
    # The tolerance absorbs float error in q * N (0.95 * 100 = 95.00000000000001).
    reached = cum >= q * n - 1e-9 * np.maximum(n, 1)
    out.append(ramp_cost[np.argmax(reached, axis=-1)])
  return np.stack(out, axis=-1)


def from_counts(param, stop_count, out_count, agree_count, correct_count, cost,
                 num_inputs, objective=None, stop_ramp=None, output_ramp=None):
  """An `Evaluation` from per-policy counts over ramps (host, float64).

  Args:
    param: `[P]`. stop_count, out_count: `[P, K]` inputs that stopped at /
      output ramp k. agree_count, correct_count: `[P]` (correct may be None).
    cost: `[K]`. num_inputs: N. objective, stop_ramp, output_ramp: optional.
  """
  n = float(num_inputs)
  stop_count = np.asarray(stop_count, np.float64)
  cost = np.asarray(cost, np.float64)
  mean_cost = stop_count @ np.cumsum(cost) / n
  q = cost_quantiles(stop_count, cost)
  return Evaluation(
      param=np.asarray(param), agreement=np.asarray(agree_count, np.float64) / n,
      accuracy=None if correct_count is None else np.asarray(correct_count, np.float64) / n,
      mean_cost=mean_cost, speedup=cost.sum() / mean_cost,
      stop_hist=stop_count / n, output_hist=np.asarray(out_count, np.float64) / n,
      p50_cost=q[..., 0], p95_cost=q[..., 1], p99_cost=q[..., 2],
      objective=objective, num_inputs=int(num_inputs),
      stop_ramp=stop_ramp, output_ramp=output_ramp)


def summarize(stop_ramp: np.ndarray, output_ramp: np.ndarray, traces: Traces, *,
              param, objective=None, return_per_input: bool = False) -> Evaluation:
  """Scores per-input decisions (any method) into an `Evaluation`.

  Args:
    stop_ramp: `[P, N]` int ramp where each input stopped (0-based).
    output_ramp: `[P, N]` int ramp whose prediction is output.
    traces: the traces the decisions were made on.
    param: `[P]` the parameter of each row.
    objective: optional `[P]` objective values.
    return_per_input: keep `stop_ramp` and `output_ramp` in the result.

  Returns:
    An `Evaluation` over the `[P]` batch.
  """
  traces = check_traces(traces)
  n, k = traces.conf.shape
  stop_ramp = np.asarray(stop_ramp)
  output_ramp = np.asarray(output_ramp)
  if stop_ramp.ndim != 2 or stop_ramp.shape[1] != n or output_ramp.shape != stop_ramp.shape:
    raise ValueError(f"stop_ramp, output_ramp: expected shape [P, N={n}], got "
                     f"{stop_ramp.shape} and {output_ramp.shape}")
  if stop_ramp.size and (stop_ramp.min() < 0 or stop_ramp.max() >= k
                         or np.any(output_ramp > stop_ramp) or output_ramp.min() < 0):
    raise ValueError(f"stop_ramp: expected ramps in [0, {k}) with output_ramp <= stop_ramp")
  p = stop_ramp.shape[0]
  rows = np.arange(p)[:, None] * k
  count = lambda r, w=None: np.bincount(
      (rows + r).ravel(), weights=None if w is None else w.ravel(),
      minlength=p * k).reshape(p, k)
  pred_out = np.take_along_axis(traces.pred, output_ramp.T, axis=1).T  # [P, N]
  agree = (pred_out == traces.pred[:, -1][None, :]).sum(1)
  correct = None if traces.label is None else (pred_out == traces.label[None, :]).sum(1)
  return from_counts(
      param, count(stop_ramp), count(output_ramp), agree, correct, traces.cost, n,
      objective=None if objective is None else np.asarray(objective, np.float64),
      stop_ramp=stop_ramp.astype(np.int32) if return_per_input else None,
      output_ramp=output_ramp.astype(np.int32) if return_per_input else None)
