"""Counters and audit in the runtimes: counts equal a per-input count, merge
by sums, the audit's share and seeding, decisions untouched."""

import os

import numpy as np
import pytest

import jexit
from jexit.counters import Counters
from jexit.runtime import ExitTable
from test_runtime import make_table, random_case, reference

DIGITS = jexit.demo_trace_path()


def slow_counts(values, pred, edges, loss, threshold, recall, num_bins):
  """Per-input loops: the counts a served stream should produce."""
  stop_ramp, output_ramp, _ = reference(values, pred, edges, loss, threshold, recall)
  k_count = values.shape[1]
  occupancy = np.zeros((k_count, num_bins), np.int64)
  for i in range(values.shape[0]):
    for k in range(stop_ramp[i] + 1):
      s = sum(1 for e in edges[k][1:-1] if e <= values[i][k])
      occupancy[k][s] += 1
  stops = np.bincount(stop_ramp, minlength=k_count)
  outputs = np.bincount(output_ramp, minlength=k_count)
  return occupancy, stops, outputs


@pytest.mark.parametrize("recall", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_counts_equal_a_per_input_count(seed, recall):
  rng = np.random.default_rng(seed)
  k, s = int(rng.integers(1, 5)), int(rng.integers(1, 7))
  edges, loss, threshold, conf, pred = random_case(rng, 300, k, s)
  table = make_table(edges, loss, threshold, np.ones(k), recall=recall, counters=True)
  plain = make_table(edges, loss, threshold, np.ones(k), recall=recall)
  got = table.run(conf, pred)
  for g, w in zip(got, plain.run(conf, pred)):  # decisions bit-identical with counters on
    np.testing.assert_array_equal(g, w)
  occupancy, stops, outputs = slow_counts(1 - conf, pred, edges, loss, threshold, recall, s)
  c = table.counters
  np.testing.assert_array_equal(c.occupancy, occupancy)
  np.testing.assert_array_equal(c.stop_hist, stops)
  np.testing.assert_array_equal(c.output_hist, outputs)
  assert c.num_inputs == 300 and c.audited == 0 and not c.nan.any()
  c.validate()


def test_counts_match_evaluate_histograms():
  traces = jexit.load_traces(DIGITS)
  model, binning = jexit.fit(traces)
  policy = jexit.solve(model, np.array([0.02]))
  path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cnt-{os.getpid()}.npz")
  jexit.export_policy(path, policy, binning, model, 0)
  try:
    table = ExitTable.load(path, counters=True)
  finally:
    os.remove(path)
  table.run(traces.conf, traces.pred)
  c = table.counters
  # evaluate's histograms (fractions of inputs) and its per-input stops
  ev = jexit.evaluate(policy, traces, binning=binning, return_per_input=True)
  n = traces.conf.shape[0]
  np.testing.assert_allclose(c.stop_hist / n, np.asarray(ev.stop_hist).reshape(-1), atol=1e-9)
  np.testing.assert_allclose(c.output_hist / n, np.asarray(ev.output_hist).reshape(-1),
                             atol=1e-9)
  stop_ramp = np.asarray(ev.stop_ramp).reshape(-1)
  bins = np.asarray(binning.assign(traces.exit_signal())).astype(np.int64)
  want = Counters(c.num_ramps, c.num_bins, audit_rows=False)
  want.record_batch(bins, stop_ramp, np.zeros_like(stop_ramp))
  np.testing.assert_array_equal(c.occupancy, want.occupancy)


def test_step_counts_and_merge_equals_concatenated_stream():
  rng = np.random.default_rng(7)
  edges, loss, threshold, conf, pred = random_case(rng, 400, 3, 5)
  whole = make_table(edges, loss, threshold, np.ones(3), counters=True)
  whole.run(conf, pred)
  parts = []
  for lo, hi in ((0, 130), (130, 131), (131, 400)):
    t = make_table(edges, loss, threshold, np.ones(3), counters=True)
    t.run(conf[lo:hi], pred[lo:hi])
    parts.append(t.counters)
  assert parts[0] + parts[1] + parts[2] == whole.counters
  assert sum(parts) == whole.counters
  # the same stream served through step(), batch by batch
  stepped = make_table(edges, loss, threshold, np.ones(3), counters=True)
  rows, state = np.arange(400), None
  for k in range(3):
    stop, state = stepped.step(k, 1 - conf[rows, k], state)
    rows, state = rows[~stop], state.take(~stop)
  assert stepped.counters == whole.counters


def test_nan_continue_counts_nan():
  rng = np.random.default_rng(3)
  edges, loss, threshold, conf, pred = random_case(rng, 200, 3, 4)
  conf[::7, 0] = np.nan
  table = make_table(edges, loss, threshold, np.ones(3), counters=True, nan="continue")
  stop_ramp, _, _ = table.run(conf, pred)
  c = table.counters.validate()
  assert c.nan[0] == len(conf[::7]) and c.nan[1:].sum() == 0
  assert c.reached[0] == 200


def test_audit_share_seeding_and_served_outputs():
  rng = np.random.default_rng(11)
  edges, loss, threshold, conf, pred = random_case(rng, 20000, 4, 6)
  plain = make_table(edges, loss, threshold, np.ones(4))
  a = make_table(edges, loss, threshold, np.ones(4), counters=True, audit=0.05, seed=1)
  b = make_table(edges, loss, threshold, np.ones(4), counters=True, audit=0.05, seed=1)
  c = make_table(edges, loss, threshold, np.ones(4), counters=True, audit=0.05, seed=2)
  want = plain.run(conf, pred)
  for t in (a, b, c):
    for g, w in zip(t.run(conf, pred), want):
      np.testing.assert_array_equal(g, w)
  n = 20000
  # share: within 4.5 binomial standard deviations of p
  assert abs(a.counters.audited - 0.05 * n) < 4.5 * np.sqrt(n * 0.05 * 0.95)
  assert a.counters == b.counters
  assert not np.array_equal(a.counters.audit_conf, c.counters.audit_conf)
  # the audited rows are whole rows of the stream, their agreement as served
  stop_ramp, output_ramp, _ = want
  rows = {tuple(r) for r in conf.tolist()}
  assert all(tuple(r) in rows for r in a.counters.audit_conf.tolist())
  idx = np.array([np.flatnonzero((conf == r).all(1))[0] for r in a.counters.audit_conf])
  np.testing.assert_array_equal(a.counters.audit_output, output_ramp[idx])
  agree = pred[idx, output_ramp[idx]] == pred[idx, -1]
  assert a.counters.audit_agree == agree.sum()
  # audited inputs are counted as served: occupancy equals the unaudited count
  np.testing.assert_array_equal(a.counters.occupancy, make_counted(edges, loss, threshold,
                                                                   conf, pred).occupancy)


def make_counted(edges, loss, threshold, conf, pred):
  t = make_table(edges, loss, threshold, np.ones(len(edges)), counters=True)
  t.run(conf, pred)
  return t.counters


def test_counters_file_round_trip_and_trace(tmp_path):
  rng = np.random.default_rng(5)
  edges, loss, threshold, conf, pred = random_case(rng, 3000, 3, 4)
  t = make_table(edges, loss, threshold, np.ones(3), counters=True, audit=0.1, seed=0)
  t.run(conf, pred)
  t.counters.save(tmp_path / "live.npz")
  back = Counters.load(tmp_path / "live.npz")
  assert back == t.counters and back.policy_sha256 == t.policy_sha256()
  rows = back.audit_trace(cost=np.ones(3))
  assert rows["conf"].shape == (back.audited, 3)


def test_bad_options():
  rng = np.random.default_rng(0)
  edges, loss, threshold, _, _ = random_case(rng, 10, 2, 3)
  with pytest.raises(ValueError, match="audit"):
    make_table(edges, loss, threshold, np.ones(2), audit=0.1)
  with pytest.raises(ValueError, match="audit"):
    make_table(edges, loss, threshold, np.ones(2), counters=True, audit=1.5)
  with pytest.raises(ValueError, match="counters"):
    make_table(edges, loss, threshold, np.ones(2), counters="yes")
  assert make_table(edges, loss, threshold, np.ones(2)).counters is None


# ----- the torch runner -----

torch = pytest.importorskip("torch")
from jexit.runtime_torch import EarlyExitRunner  # noqa: E402
from test_runtime_torch import full_trace, solved_table, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def torch_case(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cnt")
  segments, heads = tiny_model(k=4, seed=3)
  x = torch.randn(600, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
  conf, pred = full_trace(segments, heads, x)
  table = solved_table(tmp, conf, pred, recall=True, lam_frac=0.05)
  return segments, heads, x, conf, pred, table


@pytest.mark.parametrize("batching", ["compact", "bucket", "mask"])
def test_runner_counters_equal_numpy_counters(torch_case, batching):
  segments, heads, x, conf, pred, table = torch_case
  plain = EarlyExitRunner(segments, heads, table, batching=batching)
  runner = EarlyExitRunner(segments, heads, table, batching=batching, counters=True)
  np_table = ExitTable.load(table.path, out_of_range="clip", counters=True)
  np_table.run(conf, pred)
  stream = []
  for lo, hi in ((0, 37), (37, 38), (38, 300), (300, 600)):  # batch size 1 included
    got, want = runner(x[lo:hi]), plain(x[lo:hi])
    for g, w in zip(got[:1] + got[2:], want[:1] + want[2:]):
      assert torch.equal(g, w)  # decisions bit-identical with counters on
    stream.append(got)
  c = runner.counters
  assert c == np_table.counters
  assert c.policy_sha256 == np_table.policy_sha256()
  assert runner.counters is c and c.num_inputs == 600  # a second read adds nothing


@pytest.mark.parametrize("batching", ["compact", "bucket", "mask"])
def test_runner_audit_serves_policy_outputs(torch_case, batching):
  segments, heads, x, conf, pred, table = torch_case
  plain = EarlyExitRunner(segments, heads, table, batching=batching)
  runner = EarlyExitRunner(segments, heads, table, batching=batching, counters=True,
                           audit=0.3, seed=4)
  twin = EarlyExitRunner(segments, heads, table, batching=batching, counters=True,
                         audit=0.3, seed=4)
  for lo, hi in ((0, 200), (200, 201), (201, 600)):
    got, want = runner(x[lo:hi]), plain(x[lo:hi])
    twin(x[lo:hi])
    for g, w in zip(got, want):
      assert (g is None and w is None) or torch.equal(g, w)
  c = runner.counters
  assert c == twin.counters  # seeded
  assert abs(c.audited - 180) < 4.5 * np.sqrt(600 * 0.3 * 0.7)
  # counts are the served ones, as without audit
  counted = EarlyExitRunner(segments, heads, table, batching=batching, counters=True)
  counted(x)
  np.testing.assert_array_equal(c.occupancy, counted.counters.occupancy)
  np.testing.assert_array_equal(c.stop_hist, counted.counters.stop_hist)
  # audited rows are the inputs' whole rows (every ramp), served ramps attached
  idx = np.array([np.flatnonzero(np.all(np.abs(conf - r) == 0, 1))[0] for r in c.audit_conf])
  np.testing.assert_array_equal(c.audit_pred, pred[idx])
  want_stop, want_out, _ = table.run(conf, pred)
  np.testing.assert_array_equal(c.audit_output, want_out[idx])
  assert c.audit_agree == int((pred[idx, want_out[idx]] == pred[idx, -1]).sum())
  c.validate()
