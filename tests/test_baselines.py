"""Tests of the baselines: hand-worked cases, per-input loops, and the oracle bound."""

import numpy as np
import pytest

import jexit
import reference
from jexit import baselines
from jexit.evaluation import evaluate


def traces_from(u, agree, cost=(1.0, 1.0, 1.0)):
  """Traces with `1 - conf = u` at the early ramps; pred 0 = the final ramp's class."""
  u = np.asarray(u, np.float64)
  n = len(u)
  conf = np.concatenate([1.0 - u, np.ones((n, 1))], axis=1)
  pred = np.concatenate([np.where(np.asarray(agree), 0, 1), np.zeros((n, 1), int)], axis=1)
  return jexit.Traces(conf, pred, None, np.asarray(cost))


# 1 - conf at ramps 1 and 2, and whether each ramp agrees with the final one.
HAND_U = [[0.05, 0.02], [0.08, 0.05], [0.16, 0.04], [0.18, 0.12], [0.26, 0.15],
          [0.35, 0.30], [0.45, 0.22], [0.55, 0.62], [0.70, 0.35], [0.90, 0.80]]
HAND_AGREE = [[1, 1], [1, 1], [0, 1], [1, 1], [0, 0],
              [1, 1], [0, 1], [0, 0], [1, 1], [0, 1]]


def test_apparate_greedy_hand_worked_example():
  """Costs 1, 1, 1; budget 10% (one input of ten); one initial step 0.1, min step 0.05.

  t = [0, 0], steps [.1, .1]: everyone runs 3 ramps (cost 3, loss 0).
  1. +.1 at ramp 1: inputs 0, 1 exit there (cost 2.6, loss 0); +.1 at ramp 2:
     inputs 0, 1, 2 (cost 2.7, loss 0). Both lose nothing per cost saved: the
     first wins, t = [.1, 0]; both steps double (both left agreement alone).
  2. ramp 1 +.2 (t=.3) lets inputs 2 and 4 out wrong: loss .2, infeasible;
     ramp 2 +.2 (t=.2) lets 2, 3, 4 out at ramp 2 (4 wrong): cost 2.3, loss .1.
     Taken: t = [.1, .2], its step doubles to .4.
  3. ramp 1 +.2: infeasible; ramp 2 +.4 (t=.6): 5, 6, 8 also leave at ramp 2
     (7 at .62 does not): cost 2.0, loss .1, saving for free. t = [.1, .6].
  4. ramp 1 +.2 and ramp 2 +.8 (7 leaves, wrong) both infeasible: halve to
     [.1, .4]. 5. still infeasible (t=.2 lets 2 out; t=1.0 lets 7 out): halve
     to [.05, .2]. 6. ramp 1 +.05 (t=.15) changes nothing, ramp 2 +.2 lets 7
     out: the free move is taken, t = [.15, .6], steps [.1, .2].
  7. t=.25 lets 2 out, t=.8 lets 7 out: halve to [.05, .1]. 8. t=.2 and t=.7
     infeasible: ramp 1 is at the min step, ramp 2 halves to .05. 9. t=.2 and
     t=.65 infeasible, nothing can halve: stop at [.15, .6] (cost 2.0).
  """
  traces = traces_from(HAND_U, HAND_AGREE)
  t = baselines.apparate_greedy(traces, 0.1, steps=(0.1,), min_step=0.05)
  np.testing.assert_allclose(t, [0.15, 0.6, np.inf])
  ev = baselines.threshold_rule(traces, t[None])
  np.testing.assert_allclose(ev.agreement, [0.9])
  np.testing.assert_allclose(ev.mean_cost, [2.0])
  np.testing.assert_allclose(ev.stop_hist, [[0.2, 0.6, 0.2]])


def test_apparate_greedy_meets_budget_and_prefers_cheaper_step():
  rng = np.random.default_rng(0)
  n = 400
  u = rng.uniform(size=(n, 2)) ** 2
  agree = rng.uniform(size=(n, 2)) > u  # confident ramps agree more often
  traces = traces_from(u, agree, cost=(1.0, 2.0, 3.0))
  for budget in (0.0, 0.02, 0.1):
    t = baselines.apparate_greedy(traces, budget)
    ev = baselines.threshold_rule(traces, t[None])
    assert 1 - ev.agreement[0] <= budget + 1e-12
    single = [baselines.threshold_rule(
        traces, baselines.apparate_greedy(traces, budget, steps=(s,))[None]).mean_cost[0]
        for s in baselines.APPARATE_STEPS]
    np.testing.assert_allclose(ev.mean_cost[0], min(single))


def test_threshold_rules_equal_a_loop():
  rng = np.random.default_rng(1)
  traces = jexit.Traces(rng.uniform(size=(60, 4)), rng.integers(0, 3, (60, 4)),
                        rng.integers(0, 3, 60), np.array([1.0, 2.0, 1.0, 3.0]))
  # Two thresholds equal to a value of 1 - conf check the strict `<`.
  grid = np.array([0.0, 0.1, 0.3, 0.5, 0.9, 1 - traces.conf[0, 0], 1 - traces.conf[5, 1], 2.0])
  ev = baselines.global_threshold(traces, grid, return_per_input=True)
  same = baselines.threshold_rule(traces, np.repeat(grid[:, None], 4, axis=1), param=grid)
  np.testing.assert_array_equal(ev.agreement, same.agreement)
  for p, t in enumerate(grid):
    for i in range(60):
      k = next((r for r in range(3) if 1 - traces.conf[i, r] < t), 3)
      assert ev.stop_ramp[p, i] == k
  np.testing.assert_allclose(ev.param, grid)
  fast = baselines.global_threshold(traces, grid)  # the sorted-search path
  for f in ("agreement", "accuracy", "mean_cost", "stop_hist", "output_hist", "p95_cost"):
    np.testing.assert_allclose(getattr(fast, f), getattr(ev, f), err_msg=f)
  assert ev.stop_hist[0, -1] == 1.0  # t = 0: nobody exits early
  assert ev.stop_hist[-1, 0] == 1.0  # t above every value: everybody exits at ramp 1


def test_patience_fixed_and_backbone():
  pred = np.array([[1, 1, 1, 1], [1, 2, 2, 2], [1, 2, 3, 4], [5, 5, 6, 6]])
  traces = jexit.Traces(np.full((4, 4), 0.5), pred, np.array([1, 2, 4, 6]), np.ones(4))
  ev = baselines.patience(traces, [1, 2, 3], return_per_input=True)
  np.testing.assert_array_equal(ev.stop_ramp, [[1, 2, 3, 1], [2, 3, 3, 3], [3, 3, 3, 3]])
  np.testing.assert_allclose(ev.agreement, [0.75, 1.0, 1.0])
  np.testing.assert_allclose(ev.accuracy, [0.75, 1.0, 1.0])
  fixed = baselines.fixed_ramp(traces)
  np.testing.assert_allclose(fixed.mean_cost, [1, 2, 3, 4])
  np.testing.assert_allclose(fixed.agreement, [0.25, 0.5, 0.75, 1.0])
  bb = baselines.backbone(traces)
  assert bb.agreement[0] == 1.0 and bb.speedup[0] == 1.0 and bb.param[0] == 3
  with pytest.raises(ValueError, match="patiences"):
    baselines.patience(traces, [0])
  with pytest.raises(ValueError, match="ramps"):
    baselines.fixed_ramp(traces, [4])


def test_oracle_bounds_every_method():
  rng = np.random.default_rng(2)
  n, k = 300, 4
  conf = np.sort(rng.uniform(0.2, 1.0, (n, k)), axis=1)
  final = rng.integers(0, 5, n)
  pred = np.where(rng.uniform(size=(n, k)) < conf, final[:, None], (final[:, None] + 1) % 5)
  pred[:, -1] = final
  traces = jexit.Traces(conf, pred, final, np.array([1.0, 0.5, 2.0, 1.0]))
  oracle = baselines.oracle(traces, return_per_input=True)
  assert oracle.agreement[0] == 1.0  # lam = 0: earliest agreeing ramp
  agree = pred == pred[:, -1:]
  np.testing.assert_array_equal(oracle.stop_ramp[0], np.argmax(agree, axis=1))

  model, binning = jexit.fit(traces)
  lams = np.geomspace(1e-3, 1.0, 20)
  methods = {
      "recall": evaluate(jexit.solve(model, lams), traces, binning, return_per_input=True),
      "norecall": evaluate(jexit.solve(model, lams, recall=False), traces, binning,
                           return_per_input=True),
      "global_threshold": baselines.global_threshold(traces, return_per_input=True),
      "apparate_greedy": baselines.threshold_rule(
          traces, np.stack([baselines.apparate_greedy(traces, b) for b in (0.0, 0.05)]),
          return_per_input=True),
      "patience": baselines.patience(traces, return_per_input=True),
      "fixed_ramp": baselines.fixed_ramp(traces, return_per_input=True),
  }
  ramp_cost = np.cumsum(traces.cost)
  oracle_value = lambda lam: np.min(~agree + lam * ramp_cost, axis=1).mean()
  for name, ev in methods.items():
    # Per input: an agreeing output comes no earlier than the oracle's ramp.
    out_agrees = np.take_along_axis(agree[None].repeat(len(ev.param), 0),
                                    ev.output_ramp[..., None], axis=2)[..., 0]
    assert np.all(ev.stop_ramp[out_agrees] >=
                  np.broadcast_to(oracle.stop_ramp[0], ev.stop_ramp.shape)[out_agrees]), name
    # Objective at any lam: no method below the offline optimum.
    for lam in oracle.param:
      assert np.all((1 - ev.agreement) + lam * ev.mean_cost >= oracle_value(lam) - 1e-9), name
    full = ev.agreement == 1.0
    assert np.all(ev.mean_cost[full] >= oracle.mean_cost[0] - 1e-12), name
  for i, lam in enumerate(oracle.param):
    np.testing.assert_allclose((1 - oracle.agreement[i]) + lam * oracle.mean_cost[i],
                               oracle_value(lam))


def test_apparate_greedy_equals_the_from_scratch_reference():
  """The incremental search takes the same moves as re-measuring every candidate."""
  rng = np.random.default_rng(11)
  for trial in range(40):
    n, k = int(rng.integers(5, 200)), int(rng.integers(2, 6))
    conf = rng.uniform(size=(n, k))
    if trial % 2:
      conf = np.round(conf, 2)  # ties between inputs and with thresholds
    pred = rng.integers(0, 3, (n, k))
    cost = rng.choice([0.0, 0.5, 1.0, 3.0], k)
    cost[-1] = 1.0
    cost[0] = cost[0] or 0.5  # every input pays for ramp 0 (a free one is refused)
    traces = jexit.Traces(conf, pred, None, cost)
    budgets = (0.0, 0.02, 0.1)
    got = baselines.apparate_greedy(traces, budgets)
    agree = pred == pred[:, -1:]
    for b, row in zip(budgets, got):
      want = reference.apparate_greedy(1.0 - conf, agree, cost, b,
                                       baselines.APPARATE_STEPS, baselines.APPARATE_MIN_STEP)
      np.testing.assert_array_equal(row, want)
      np.testing.assert_array_equal(baselines.apparate_greedy(traces, b), want)


def test_oracle_equals_argmin_over_every_ramp():
  rng = np.random.default_rng(12)
  for _ in range(30):
    n, k = int(rng.integers(1, 60)), int(rng.integers(1, 6))
    pred = rng.integers(0, 3, (n, k))
    cost = rng.choice([0.0, 0.5, 1.0, 3.0], k)
    cost[0] += 0.1
    traces = jexit.Traces(rng.uniform(size=(n, k)), pred, None, cost)
    lam = np.concatenate([[0.0, 0.5, 1.0, 2.0], rng.exponential(1.0, 20)])
    value = ((pred != pred[:, -1:])[None] + lam[:, None, None] * np.cumsum(cost))
    want = np.argmin(value, axis=2)  # earliest on ties
    ev = baselines.oracle(traces, lam, return_per_input=True)
    np.testing.assert_array_equal(ev.stop_ramp, want)


def test_threshold_policy_table_makes_the_rule_s_decisions(tmp_path):
  """Per-ramp thresholds as a table: evaluate, the exported file and the numpy
  runtime all stop where `threshold_rule` does, ties (1 - conf == t) included."""
  from jexit.export import export_policy
  from jexit.runtime import ExitTable
  rng = np.random.default_rng(4)
  n, k = 400, 4
  conf = rng.uniform(0.2, 1.0, (n, k)).astype(np.float32)
  pred = rng.integers(0, 3, (n, k))
  traces = jexit.Traces(conf, pred, rng.integers(0, 3, n), np.array([1.0, 2.0, 1.5, 3.0]))
  u = 1.0 - np.asarray(conf, np.float64)
  cases = [np.array([0.1, 0.3, 0.2, 0.0]), np.array([0.0, 0.0, 0.0, 0.0]),
           np.array([2.0, 0.5, -1.0, 7.0]), u[7],  # t_k equal to an input's 1 - conf
           0.25]  # one global threshold
  for i, t in enumerate(cases):
    policy, binning = baselines.threshold_policy(t, traces.cost)
    tk = np.broadcast_to(t, (k,))
    want = baselines.threshold_rule(traces, tk[None], return_per_input=True)
    got = evaluate(policy, traces, binning, return_per_input=True)
    np.testing.assert_array_equal(got.stop_ramp, want.stop_ramp)
    np.testing.assert_array_equal(got.output_ramp, want.stop_ramp)
    np.testing.assert_allclose(got.speedup, want.speedup)
    path = tmp_path / f"t{i}.npz"
    export_policy(path, policy, binning, None, 0)
    stop, output, _ = ExitTable.load(path).run(conf, pred)
    np.testing.assert_array_equal(stop, want.stop_ramp[0])
    np.testing.assert_array_equal(output, want.stop_ramp[0])
  assert int(np.sum(want.stop_ramp[0] < k - 1)) > 0


def test_threshold_policy_rejects_bad_input():
  with pytest.raises(ValueError, match="thresholds"):
    baselines.threshold_policy([0.1, np.nan, 0.2], [1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="thresholds"):
    baselines.threshold_policy([0.1, 0.2], [1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="cost"):
    baselines.threshold_policy([0.1, 0.2, 0.3], [1.0, -1.0, 1.0])
