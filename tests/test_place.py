"""Ramp placement (jexit.subsets, jexit.place): subsets, costs, models, the batched
solve, the choice, the runtimes serving a subset table (with its monitoring
reference), and the CLI."""

import itertools
import json
import math

import numpy as np
import pytest

import jexit
from jexit import cli
from jexit import place as pl
from jexit import subsets as sb
from jexit.evaluation import evaluate
from jexit.export import add_reference, export_placement, export_policy
from jexit.fit import fit, row_laws
from jexit.monitor import make_reference
from jexit.runtime import ExitTable
from jexit.solver import solve
from jexit.traces import signal_values, split_rows


def cand_traces(n=800, k=5, seed=0, head=0.3, position=None, labels=True):
  """Candidate ramps that get better along the network; heads cost `head` each."""
  rng = np.random.default_rng(seed)
  hard = rng.uniform(size=n)
  z = 3 * (np.linspace(0.1, 1, k)[None] - hard[:, None]) + rng.normal(0, 0.6, (n, k))
  conf = np.clip(0.5 + 0.5 / (1 + np.exp(-z)), 0, 1)
  final = rng.integers(0, 4, n)
  pred = np.where(rng.uniform(size=(n, k)) < conf ** 3, final[:, None],
                  (final[:, None] + 1 + rng.integers(0, 3, (n, k))) % 4)
  pred[:, -1] = final
  head_cost = np.full(k, float(head))
  cost = np.full(k, 1.0) + head_cost
  if position is not None:
    position = np.asarray(position)
    shared = np.r_[False, np.diff(position) == 0]
    cost = np.where(shared, head_cost, cost)
  return jexit.Traces(conf, pred, final if labels else None, cost, head_cost=head_cost,
                      position=position)


# ---------------------------------------------------------------- subsets

@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_every_subset_keeps_the_last_ramp_and_counts_2_to_the_k_minus_1(k):
  subsets = sb.enumerate_subsets(k)
  assert len(subsets) == 2 ** (k - 1) == len(set(subsets))
  assert all(a[-1] == k - 1 and list(a) == sorted(set(a)) for a in subsets)
  brute = {tuple(sorted(set(c) | {k - 1})) for r in range(k)
           for c in itertools.combinations(range(k - 1), r)}
  assert set(subsets) == brute


@pytest.mark.parametrize("k,m", [(5, 1), (5, 2), (6, 3), (8, 4), (8, 8)])
def test_max_ramps_counts_binomials(k, m):
  subsets = sb.enumerate_subsets(k, max_ramps=m)
  assert len(subsets) == sum(math.comb(k - 1, j) for j in range(m))
  assert max(len(a) for a in subsets) == min(m, k)


def test_must_include_and_positions():
  subsets = sb.enumerate_subsets(6, must_include=[1, 3])
  assert len(subsets) == 2 ** 3 and all({1, 3, 5} <= set(a) for a in subsets)
  # Positions 0,0,1,1,1,2: at most one head per position, the last kept.
  pos = [0, 0, 1, 1, 1, 2]
  subsets = sb.enumerate_subsets(6, position=pos)
  assert len(subsets) == 3 * 4  # (none or one of 2 heads) x (none or one of 3)
  assert all(len({pos[r] for r in a}) == len(a) for a in subsets)
  # The last position's other heads never join the last ramp.
  pos = [0, 1, 1]
  assert sb.enumerate_subsets(3, position=pos) == [(2,), (0, 2)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_ramps=0), "max_ramps: expected an integer >= 1"),
    (dict(must_include=[7]), r"must_include: expected 0-based candidate ramps in \[0, 5\)"),
    (dict(must_include=[0, 1], max_ramps=2), "max_ramps: expected at least 3"),
])
def test_subset_arguments_are_checked(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sb.enumerate_subsets(5, **kwargs)


def test_evenly_spaced_ends_with_the_last_ramp():
  assert sb.evenly_spaced(13, 3) == (3, 8, 12)
  assert sb.evenly_spaced(5, 5) == (0, 1, 2, 3, 4)
  assert sb.evenly_spaced(5, 1) == (4,)
  assert sb.evenly_spaced(6, 2, position=[0, 0, 1, 1, 2, 2]) == (3, 5)


# ------------------------------------------------------------------ costs

def test_subset_costs_merge_segments_and_keep_active_heads_only():
  cost = np.array([3.0, 5.0, 2.0, 4.0])
  head = np.array([1.0, 2.0, 1.0, 1.0])  # segments 2, 3, 1, 3
  np.testing.assert_allclose(sb.subset_costs(cost, head, [0, 1, 2, 3]), cost)
  np.testing.assert_allclose(sb.subset_costs(cost, head, [1, 3]), [2 + 3 + 2, 1 + 3 + 1])
  np.testing.assert_allclose(sb.subset_costs(cost, head, [3]), [2 + 3 + 1 + 3 + 1])
  assert sb.backbone_cost(cost, head) == 10.0
  # Closed form for every subset: total = all segments + the active heads.
  for a in sb.enumerate_subsets(4):
    assert np.isclose(sb.subset_costs(cost, head, a).sum(), 9.0 + head[list(a)].sum())
  # Heads sharing a position: the second head has no segment of its own.
  cost, head = np.array([4.0, 1.0, 3.0]), np.array([1.0, 1.0, 2.0])  # positions 0, 0, 1
  np.testing.assert_allclose(sb.subset_costs(cost, head, [1, 2]), [3 + 0 + 1, 1 + 2])
  np.testing.assert_allclose(sb.subset_costs(cost, head, [0, 2]), [4, 3])


def test_head_costs_from_the_trace_or_given():
  t = cand_traces()
  np.testing.assert_allclose(sb.head_costs(t), 0.3)
  np.testing.assert_allclose(sb.head_costs(t._replace(head_cost=None), 0.2), 0.2)
  with pytest.raises(ValueError, match="traces.head_cost: ramp placement needs"):
    sb.head_costs(t._replace(head_cost=None))
  with pytest.raises(ValueError, match=r"head_cost: expected \[K=5\] values in \[0, cost"):
    sb.head_costs(t, 2.0)


# ----------------------------------------------------------------- models

def test_a_subsets_model_is_the_model_fitted_on_its_columns():
  t = cand_traces(k=5)
  rows = split_rows(t.num_inputs, seed=1)[0]
  pieces = sb.place_models(t, rows, num_bins=16)
  for a in [(4,), (0, 4), (1, 3, 4), (0, 1, 2, 3, 4), (2, 4)]:
    model, binning = sb.subset_model(pieces, a)
    cols = list(a)
    sub = t._replace(conf=t.conf[:, cols], pred=t.pred[:, cols], cost=t.cost[cols],
                     head_cost=None)
    ref, ref_bins = fit(sub, rows=rows, num_bins=16)
    np.testing.assert_allclose(binning.edges, ref_bins.edges, rtol=0, atol=0)
    np.testing.assert_allclose(model.init, ref.init, rtol=1e-12)
    np.testing.assert_allclose(model.trans, ref.trans, rtol=1e-12)
    np.testing.assert_allclose(model.loss, ref.loss, rtol=1e-12)
    np.testing.assert_allclose(model.cost, sb.subset_costs(t.cost, t.head_cost, a))


def test_pair_transitions_are_counted_not_composed():
  # Ramp 2 repeats ramp 0's signal; ramp 1 is noise: 0 -> 2 is a near-identity
  # move, while composing 0 -> 1 -> 2 would mix every bin.
  rng = np.random.default_rng(3)
  n = 2000
  v0, v1 = rng.uniform(0.5, 1, n), rng.uniform(0.5, 1, n)
  conf = np.stack([v0, v1, v0], 1)
  pred = rng.integers(0, 2, (n, 3))
  t = jexit.Traces(conf, pred, None, np.full(3, 1.0), head_cost=np.full(3, 0.1))
  pieces = sb.place_models(t, num_bins=4, smoothing=1.0)
  direct, _ = sb.subset_model(pieces, (0, 2))
  chain, _ = sb.subset_model(pieces, (0, 1, 2))
  b = pieces.binning.assign(1 - conf)
  counts = np.zeros((4, 4))
  np.add.at(counts, (b[:, 0], b[:, 2]), 1)
  np.testing.assert_allclose(direct.trans[0], row_laws(counts + 1.0))
  assert np.all(np.diag(direct.trans[0]) > 0.95)
  composed = chain.trans[0] @ chain.trans[1]
  assert np.all(np.diag(composed) < 0.5)


# ----------------------------------------------------------- batched solve

def test_the_batched_solve_equals_solving_each_subset_alone():
  t = cand_traces(k=4, n=600)
  pieces = sb.place_models(t, num_bins=8)
  subsets = sb.enumerate_subsets(4)
  models = [sb.subset_model(pieces, a)[0] for a in subsets]
  lam = sb.placement_lambdas(pieces, subsets, 40)
  batched, calls = sb.solve_subsets(models, lam, by_size=False)  # one padded call
  assert calls == 1
  per_size, calls = sb.solve_subsets(models, lam)  # one call per subset size
  assert calls == 4
  for model, pol, pol_size in zip(models, batched, per_size):
    alone = solve(model, lam)
    for p in (pol, pol_size):
      np.testing.assert_array_equal(np.asarray(p.threshold), np.asarray(alone.threshold))
      np.testing.assert_allclose(np.asarray(p.value), np.asarray(alone.value), rtol=2e-5)
      np.testing.assert_array_equal(np.asarray(p.loss), np.asarray(alone.loss))
  # A small memory budget splits the batch into calls, with the same result.
  chunked, calls = sb.solve_subsets(models, lam, max_bytes=40 * 4 * 8 * 4 * 3, by_size=False)
  assert calls > 2
  for a, b in zip(batched, chunked):
    np.testing.assert_array_equal(np.asarray(a.threshold), np.asarray(b.threshold))


@pytest.fixture(scope="module")
def placed():
  t = cand_traces(k=5, n=1200, seed=2)
  return t, pl.place(t, [0.01, 0.05], num_bins=12, num_lambdas=60,
                     fixed={"paper": (1, 2, 4)})


def test_place_scores_each_subset_as_evaluate_does_on_its_columns(placed):
  t, res = placed
  fit_r, test_r = split_rows(t.num_inputs, seed=0)
  base = sb.backbone_cost(t.cost, t.head_cost)
  for a in [(4,), (0, 4), (1, 2, 4), (0, 1, 2, 3, 4)]:
    i = res.index(a)
    cols = list(a)
    sub = t._replace(conf=t.conf[:, cols], pred=t.pred[:, cols], head_cost=None,
                     cost=res.models[i].cost)
    for rows, agr, spd in ((fit_r, res.fit_agreement, res.fit_speedup),
                           (test_r, res.test_agreement, res.test_speedup)):
      ev = evaluate(res.policies[i], sub.take(rows), res.binnings[i], method="replay")
      np.testing.assert_allclose(agr[i], ev.agreement, rtol=0, atol=1e-12)
      np.testing.assert_allclose(spd[i], base / ev.mean_cost, rtol=1e-12)


def test_the_choice_is_the_brute_force_best_on_fit_rows(placed):
  _, res = placed
  m, num_l = len(res.subsets), len(res.lambdas)
  for b in res.budgets:
    ok = 1 - res.fit_agreement[:m] <= b.max_loss + 1e-12
    best = np.max(np.where(ok, res.fit_speedup[:m], -np.inf))
    e = b.placed
    assert e["fit"]["speedup"] == pytest.approx(best, rel=1e-12)
    i = res.subsets.index(tuple(e["active_ramps"]))
    assert res.fit_speedup[i, e["lam_index"]] == pytest.approx(best, rel=1e-12)
    assert res.test_speedup[i, e["lam_index"]] == pytest.approx(e["test"]["speedup"])
    # At least as fast on the fit rows as every comparison (they are subsets of it).
    for name in ("all_ramps", "best_evenly_spaced", "greedy", "paper"):
      other = b.methods[name]
      if other is not None:
        assert e["fit"]["speedup"] >= other["fit"]["speedup"] - 1e-12
    assert sum(e["test"]["stop_hist"]) == pytest.approx(1.0)
    assert all(e["test"]["stop_hist"][r] == 0 for r in range(5) if r not in e["active_ramps"])
    assert len(b.methods["evenly_spaced"]) == 5
    assert m * num_l == res.fit_agreement[:m].size


def test_greedy_keeps_only_ramps_of_nonnegative_utility(placed):
  _, res = placed
  for b in res.budgets:
    g = b.methods["greedy"]
    if g is None:
      continue
    assert g["active_ramps"][-1] == 4
    assert all(u >= 0 for u in g["utilities"].values())


def test_cheap_heads_keep_more_ramps_than_expensive_heads():
  kept = []
  for head in (0.01, 1.5):
    t = cand_traces(k=5, n=1500, seed=4, head=head)
    res = pl.place(t, 0.05, num_bins=12, num_lambdas=60, compare=False)
    kept.append(len(res.budgets[0].placed["active_ramps"]))
  assert kept[0] > kept[1]


def test_certified_placement_walks_the_chosen_subsets_lam_path():
  t = cand_traces(k=4, n=3000, seed=5)
  res = pl.place(t, 0.05, delta=0.1, num_bins=12, num_lambdas=60, compare=False)
  b = res.budgets[0]
  assert b.uncertified is not None
  if isinstance(b.certificate, jexit.certify.Certificate):
    assert b.placed["active_ramps"] == b.uncertified["active_ramps"]
    assert b.certificate.index == b.placed["lam_index"]
    assert b.certificate.ucb <= 0.05 + 1e-12 or b.certificate.pvalue <= 0.1
  # Far too few rows to certify a tiny budget: the backbone ships.
  small = pl.place(cand_traces(k=3, n=60), 0.001, delta=0.1, num_bins=4, num_lambdas=10,
                   compare=False)
  sb = small.budgets[0]
  if sb.uncertified is not None:
    assert isinstance(sb.certificate, jexit.certify.Fallback)
    assert sb.placed["active_ramps"] == [2]


def test_place_refuses_what_it_cannot_do():
  t = cand_traces()
  with pytest.raises(ValueError, match="traces.head_cost"):
    pl.place(t._replace(head_cost=None), 0.01)
  with pytest.raises(ValueError, match="signal: ramp placement bins a per-ramp signal"):
    pl.place(t, 0.01, signal="stability")
  with pytest.raises(ValueError, match=r"max_loss: expected agreement-loss budgets"):
    pl.place(t, 1.5)
  with pytest.raises(ValueError, match=r"fixed\['x'\]: expected a subset that keeps"):
    pl.place(t, 0.01, fixed={"x": (0, 1)})


# ---------------------------------------------------------------- runtimes

def _replayed(res, e, t, rows):
  """Per-input stop and output ramps (candidate indices) by jexit.evaluate."""
  i = e["subset_index"]
  cols = list(e["active_ramps"])
  sub = t._replace(conf=t.conf[:, cols], pred=t.pred[:, cols], head_cost=None,
                   cost=res.models[i].cost).take(rows)
  pol = res.policies[i]
  one = pol._replace(threshold=np.asarray(pol.threshold)[e["lam_index"]][None],
                     value=np.asarray(pol.value)[e["lam_index"]][None],
                     lam=np.asarray(pol.lam)[e["lam_index"]][None])
  ev = evaluate(one, sub, res.binnings[i], return_per_input=True)
  return np.asarray(cols)[ev.stop_ramp[0]], np.asarray(cols)[ev.output_ramp[0]]


def test_the_numpy_runtime_serves_a_subset_table_on_the_candidate_trace(placed, tmp_path):
  t, res = placed
  b = res.budgets[1]
  assert len(b.placed["active_ramps"]) < 5
  path = tmp_path / "p.npz"
  header = export_placement(path, res, b, t)
  assert header["active_ramps"] == b.placed["active_ramps"]
  table = ExitTable.load(path)
  _, test_r = split_rows(t.num_inputs, seed=0)
  stop, out, out_pred = table.run(t.conf[test_r], t.pred[test_r])
  ref_stop, ref_out = _replayed(res, b.placed, t, test_r)
  np.testing.assert_array_equal(stop, ref_stop)
  np.testing.assert_array_equal(out, ref_out)
  np.testing.assert_array_equal(out_pred, t.pred[test_r, out])
  assert set(np.unique(stop)) <= set(b.placed["active_ramps"])
  agreement = np.mean(out_pred == t.pred[test_r, -1])
  assert agreement == pytest.approx(b.placed["test"]["agreement"])
  # Its own K columns: the table's ramps, as any table.
  cols = b.placed["active_ramps"]
  own = table.run(t.conf[test_r][:, cols], t.pred[test_r][:, cols])
  np.testing.assert_array_equal(np.asarray(cols)[own[0]], stop)
  assert cols[-1] > len(cols)  # 4 columns are neither the table's K nor the candidates'
  with pytest.raises(ValueError, match="pred: expected the table's K="):
    table.run(t.conf[:, :4], t.pred[:, :4])


def test_a_subset_table_carries_the_reference_of_its_active_ramps(placed, tmp_path):
  t, res = placed
  b = res.budgets[1]
  e, i = b.placed, b.placed["subset_index"]
  path = tmp_path / "p.npz"
  header = export_placement(path, res, b, t)
  assert header["reference_inputs"] == t.num_inputs
  occupancy, stops, n = ExitTable.load(path).reference
  # By hand: the subset's policy replayed on every row of its own columns.
  cols = list(e["active_ramps"])
  sub = t._replace(conf=t.conf[:, cols], pred=t.pred[:, cols], head_cost=None,
                   cost=res.models[i].cost)
  pol = res.policies[i]
  j = e["lam_index"]
  one = pol._replace(threshold=np.asarray(pol.threshold)[j][None],
                     value=np.asarray(pol.value)[j][None], lam=np.asarray(pol.lam)[j][None])
  ev = evaluate(one, sub, res.binnings[i], return_per_input=True)
  bins = res.binnings[i].assign(signal_values(sub, res.binnings[i].signal))
  ref = make_reference(bins, ev.stop_ramp[0], res.binnings[i].num_bins)
  np.testing.assert_array_equal(occupancy, ref.occupancy)
  np.testing.assert_array_equal(stops, ref.stop_hist)
  assert n == ref.num_inputs == t.num_inputs
  # The same as a plain export of the restricted trace stores.
  plain = tmp_path / "plain.npz"
  export_policy(plain, pol, res.binnings[i], res.models[i], j, traces=sub)
  add_reference(plain, sub)
  ref_occ, ref_stops, ref_n = ExitTable.load(plain).reference
  np.testing.assert_array_equal(occupancy, ref_occ)
  np.testing.assert_array_equal(stops, ref_stops)
  assert n == ref_n


def test_the_torch_runner_runs_only_the_active_heads(tmp_path):
  torch = pytest.importorskip("torch")
  from jexit.record import record
  from jexit.runtime_torch import EarlyExitRunner

  class Count(torch.nn.Module):
    def __init__(self, inner):
      super().__init__()
      self.inner, self.calls = inner, 0

    def forward(self, x):
      self.calls += 1
      return self.inner(x)

  g = torch.Generator().manual_seed(0)
  width, classes, p_count = 8, 4, 4
  segments, heads = [], []
  for p in range(p_count):
    lin = torch.nn.Linear(width, width).double()
    with torch.no_grad():
      lin.weight.copy_(torch.randn(width, width, generator=g, dtype=torch.float64) * 0.8
                       + torch.eye(width, dtype=torch.float64))
    segments.append(torch.nn.Sequential(lin, torch.nn.Tanh()).eval())
    group = []
    for _ in range(2 if p == 1 else 1):  # two candidate heads at position 1
      h = torch.nn.Linear(width, classes).double()
      with torch.no_grad():
        h.weight.copy_(torch.randn(classes, width, generator=g, dtype=torch.float64)
                       * (1 + 2 * p))
      group.append(Count(h).eval())
    heads.append(group if len(group) > 1 else group[0])
  x = torch.randn(1500, width, generator=g, dtype=torch.float64)
  t = record(segments, heads, x, batch_size=500, device="cpu")
  assert t.position is not None and t.num_ramps == 5
  assert t.position.tolist() == [0, 1, 1, 2, 3]
  # Candidate 2, the second head at position 1, is kept: its segment is position 1's.
  res = pl.place(t, 0.05, num_bins=8, num_lambdas=60, compare=False, max_ramps=3,
                 must_include=[2])
  b = res.budgets[0]
  path = tmp_path / "p.npz"
  export_placement(path, res, b, t)
  active = b.placed["active_ramps"]
  assert 2 in active and 1 not in active
  flat = [h for hh in heads for h in (hh if isinstance(hh, list) else [hh])]
  for h in flat:
    h.calls = 0
  table = ExitTable.load(path)
  for batching in ("compact", "mask"):
    runner = EarlyExitRunner(segments, heads, table, batching=batching)
    out = runner(x)
    stop, outr, pred = table.run(t.conf, t.pred)
    np.testing.assert_array_equal(out.stop_ramp.numpy(), stop)
    np.testing.assert_array_equal(out.output_ramp.numpy(), outr)
    np.testing.assert_array_equal(out.pred.numpy(), pred)
  # Only the active heads ever ran.
  assert all((h.calls > 0) == (j in active) for j, h in enumerate(flat))
  one = EarlyExitRunner(segments, heads, table)(x[:1])
  assert int(one.stop_ramp[0]) == stop[0] and int(one.output_ramp[0]) == outr[0]
  # A table whose active ramps do not fit the model is refused.
  with pytest.raises(ValueError, match="heads: the table's active_ramps"):
    EarlyExitRunner(segments[:2], heads[:2], table)


# --------------------------------------------------------------------- CLI

def run(capsys, *argv):
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("traces") / "cand.npz"
  jexit.save_traces(path, cand_traces(k=4, n=800, seed=6))
  return str(path)


def test_cli_place_prints_writes_json_plot_and_table(trace_file, tmp_path, capsys):
  rc, out, _ = run(capsys, "place", trace_file, "--max-loss", "0.05", "--num-lambdas", "50",
                   "--num-bins", "12", "--json", tmp_path / "p.json", "--plot",
                   tmp_path / "p.png", "--out", tmp_path / "p.npz")
  assert rc == 0, out
  assert "budget 0.05:" in out and "placed" in out and "greedy" in out
  data = json.loads((tmp_path / "p.json").read_text())
  assert data["num_subsets"] == 8 and data["budgets"][0]["placed"]["active_ramps"][-1] == 3
  assert data["frontier"] and (tmp_path / "p.png").stat().st_size > 1000
  table = ExitTable.load(tmp_path / "p.npz")
  assert table.active_ramps == data["budgets"][0]["placed"]["active_ramps"]
  rc, out, _ = run(capsys, "export", trace_file, "--max-loss", "0.05", "--place",
                   "--max-ramps", "2", "--delta", "none", "--out", tmp_path / "e.npz")
  assert rc == 0 and "active ramps" in out
  assert len(ExitTable.load(tmp_path / "e.npz").active_ramps) <= 2


def test_jexit_monitor_watches_a_placed_table(trace_file, tmp_path, capsys):
  path = tmp_path / "e.npz"
  rc, _, err = run(capsys, "export", trace_file, "--max-loss", "0.05", "--place",
                   "--max-ramps", "2", "--delta", "none", "--out", path)
  assert rc == 0, err
  t = jexit.load_traces(trace_file)
  table = ExitTable.load(path, counters=True)
  assert table.reference[2] == t.num_inputs and table.active_ramps[-1] == 3
  table.run(t.conf, t.pred)  # the full candidate trace; the active columns are read
  table.counters.save(tmp_path / "live.npz")
  np.testing.assert_array_equal(table.counters.occupancy, table.reference[0])
  np.testing.assert_array_equal(table.counters.stop_hist, table.reference[1])
  rc, out, _ = run(capsys, "monitor", path, tmp_path / "live.npz")
  assert rc == 0 and "verdict: ok" in out
  shifted = ExitTable.load(path, counters=True)
  shifted.run(t.conf ** 4, t.pred)  # every ramp less confident
  shifted.counters.save(tmp_path / "shifted.npz")
  rc, out, _ = run(capsys, "monitor", path, tmp_path / "shifted.npz")
  assert rc == 1 and "verdict: drift" in out


@pytest.mark.parametrize("extra,match", [
    (("--max-ramps", "0"), "--max-ramps: expected an integer >= 1, got 0"),
    (("--must-include", "9"), r"--must-include: expected 0-based candidate ramps in \[0, 4\)"),
    (("--must-include", "x"), None),
    (("--max-loss", "0.01,2"), r"--max-loss: expected agreement-loss budgets in \[0, 1\]"),
    (("--max-loss", "0.01,0.02", "--out", "x.npz"), "--out: writes one table"),
])
def test_cli_place_errors_are_one_line(trace_file, capsys, extra, match):
  argv = ["place", trace_file] + (["--max-loss", "0.05"] if "--max-loss" not in extra else [])
  if match is None:
    with pytest.raises(SystemExit) as e:
      cli.main(argv + list(extra))
    assert e.value.code == 2
    return
  rc, _, err = run(capsys, *argv, *extra)
  assert rc == 2 and err.startswith("jexit: error: ") and err.count("\n") == 1
  assert match is None or __import__("re").search(match, err)


def test_cli_place_without_head_cost(tmp_path, capsys):
  path = tmp_path / "nohead.npz"
  jexit.save_traces(path, cand_traces(k=3, n=300)._replace(head_cost=None))
  rc, _, err = run(capsys, "place", path, "--max-loss", "0.05")
  assert rc == 2 and "head_cost" in err and "--head-cost" in err
  rc, out, _ = run(capsys, "place", path, "--max-loss", "0.05", "--head-cost", "0.2",
                   "--num-lambdas", "20")
  assert rc == 0 and "3 candidates" in out
