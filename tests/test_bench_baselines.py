"""The benchmark's baselines solve the same problem as jexit.solve.

`benchmarks/bench_solver.py` times QuantEcon on a sparse (ramp, x, s) model
built with numpy, and a plain-loop reference; a wrong build would make the
timings compare different problems. QuantEcon itself is not needed here: its
backward induction is redone in numpy on the same R, Q and pairs.
"""

import numpy as np
import pytest

import jexit


def _backward_induction(qe, lam, horizon):
  """QuantEcon's `backward_induction` on the state-action-pair form, in numpy."""
  reward = qe.stop_reward + lam * qe.cont_cost
  v = np.zeros(qe.n)
  first = np.flatnonzero(np.r_[True, qe.s_ind[1:] != qe.s_ind[:-1]])
  for _ in range(horizon):
    v = np.maximum.reduceat(reward + qe.q @ v, first)
  return v


@pytest.mark.parametrize("s, k", [(4, 3), (5, 4)])
def test_quantecon_model_and_loop_equal_jexit(s, k, load_script):
  pytest.importorskip("scipy")
  bench = load_script("benchmarks/bench_solver.py")
  model = bench.random_model(3, s, k, 1)
  one = [np.asarray(getattr(model, f)[0], np.float64) for f in ("init", "trans", "loss", "cost")]
  qe = bench.QuantEconRecall(*one)
  assert qe.n == k * k * s * s + 1  # X = K * S distinct losses
  np.testing.assert_allclose(np.asarray(qe.q.sum(axis=1)).ravel(), 1.0, rtol=1e-12)
  assert np.all(np.diff(qe.s_ind) >= 0)  # pairs sorted by state, as DiscreteDP expects
  lam = np.array([0.01, 0.2, 1.0])
  policy = jexit.solve(jexit.ExitModel(*(f.astype(np.float32) for f in one)), lam)
  loss32 = np.asarray(policy.loss, np.float64)  # the float32 losses jexit solved
  qe = bench.QuantEconRecall(one[0], one[1], loss32, one[3])
  for i, l in enumerate(lam):
    v = _backward_induction(qe, l, k)
    start = qe.idx[0] * s + np.arange(s)  # ramp 0, x = idx_0(a), s = a
    via_pairs = l * one[3][0] - one[0] @ v[start]
    via_loop = bench.loop_solve(one[0], one[1], loss32, one[3], l)
    np.testing.assert_allclose(via_pairs, policy.value[i], rtol=1e-5)
    np.testing.assert_allclose(via_loop, policy.value[i], rtol=1e-5)


def test_numpy_recall_equals_jexit(load_script):
  """The benchmark's float64 precision check reproduces values and thresholds."""
  bench = load_script("benchmarks/bench_solver.py")
  model = bench.random_model(5, 6, 4, 1)
  lam = np.array([0.003, 0.05, 0.4])
  policy = jexit.solve(model, lam)
  init, trans, cost = (np.asarray(getattr(model, f)[0], np.float64)
                       for f in ("init", "trans", "cost"))
  loss32 = np.asarray(policy.loss[0], np.float64)  # [M = 1, ...] batches
  stops = 0
  for i, l in enumerate(lam):
    value, threshold = bench.numpy_recall(init, trans, loss32, cost, l)
    np.testing.assert_allclose(value, policy.value[0, i], rtol=1e-5)
    np.testing.assert_array_equal(threshold.astype(np.float32), policy.threshold[0, i])
    stops += np.isfinite(threshold[:-1]).sum()
  assert stops > 0  # some ramp stops somewhere: the thresholds are not all -inf
