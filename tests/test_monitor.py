"""jexit.monitor: counters, their file, the drift and budget tests, the verdict."""

import doctest
import io
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from scipy import special, stats

import jexit
from jexit import monitor
from jexit.monitor import Counters, Reference, check, make_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----- helpers -----

def random_stream(rng, n, k, s):
  """Per-input bins [N, K], stop and output ramps [N] of a made-up policy."""
  bins = rng.integers(0, s, (n, k))
  stop = rng.integers(0, k, n)
  out = (rng.uniform(size=n) * (stop + 1)).astype(np.int64)  # output <= stop
  bins = np.where(np.arange(k)[None, :] <= stop[:, None], bins, -1)  # unreached: junk
  return bins, stop, out


def count_as_a_server(counters, bins, stop, out, batch=37):
  """`update` per ramp on the inputs still running, then `record_stops`."""
  for start in range(0, len(stop), batch):
    b, st, o = bins[start:start + batch], stop[start:start + batch], out[start:start + batch]
    for k in range(counters.num_ramps):
      counters.update(k, b[st >= k, k])
    counters.record_stops(st, o)
  return counters


def audit_rows(rng, a, k, classes=3):
  pred = rng.integers(0, classes, (a, k))
  return rng.uniform(size=(a, k)), pred, rng.integers(0, k, a)


def law(rng, k, s):
  """A made-up Markov law of bins and a stop rule: draws `(bins, stop)`."""
  init = rng.dirichlet(np.ones(s))
  trans = rng.dirichlet(np.ones(s), size=(k - 1, s))
  stop_prob = rng.uniform(0.1, 0.6, (k, s))

  def draw(rng, n):
    bins = np.empty((n, k), np.int64)
    bins[:, 0] = rng.choice(s, n, p=init)
    for r in range(1, k):
      u = rng.uniform(size=(n, 1))
      bins[:, r] = (u > np.cumsum(trans[r - 1][bins[:, r - 1]], axis=1)).sum(1).clip(0, s - 1)
    stops = rng.uniform(size=(n, k)) < stop_prob[np.arange(k)[None, :], bins]
    stops[:, -1] = True
    return bins, np.argmax(stops, axis=1)
  return draw


def live_counters(bins, stop, s, **kw):
  c = Counters(bins.shape[1], s, **kw)
  c.record_batch(bins, stop, stop)
  return c


# ----- counting -----

def test_counts_on_hand_made_inputs():
  c = Counters(3, 4, audit_rows=False)
  c.update(0, np.array([0, 3, 3, 1]))
  c.update(1, np.array([3, 2]), nan=np.array([False, True]))
  c.update(2, np.array([], np.int64))
  c.record_stops(np.array([0, 1, 0, 1]), np.array([0, 0, 0, 1]))
  np.testing.assert_array_equal(c.occupancy, [[1, 1, 0, 2], [0, 0, 0, 1], [0, 0, 0, 0]])
  np.testing.assert_array_equal(c.nan, [0, 1, 0])
  np.testing.assert_array_equal(c.stop_hist, [2, 2, 0])
  np.testing.assert_array_equal(c.output_hist, [3, 1, 0])
  np.testing.assert_array_equal(c.reached, [4, 2, 0])
  assert c.num_inputs == 4
  c.validate()
  c.record_audit(np.array([[1, 2, 2], [0, 1, 2]]), np.array([2, 0]))
  assert (c.audited, c.audit_agree) == (2, 1)


def test_record_batch_equals_histogram_recount_and_server_counting():
  rng = np.random.default_rng(0)
  n, k, s = 1000, 4, 6
  bins, stop, out = random_stream(rng, n, k, s)
  c = Counters(k, s)
  c.record_batch(bins, stop, out)
  for r in range(k):
    want, _ = np.histogram(bins[stop >= r, r], bins=np.arange(s + 1))
    np.testing.assert_array_equal(c.occupancy[r], want)
  np.testing.assert_array_equal(c.stop_hist, np.histogram(stop, bins=np.arange(k + 1))[0])
  np.testing.assert_array_equal(c.output_hist, np.histogram(out, bins=np.arange(k + 1))[0])
  assert c.num_inputs == n
  assert count_as_a_server(Counters(k, s), bins, stop, out) == c.validate()


def test_counters_equal_evaluate_histograms_on_a_served_trace():
  rng = np.random.default_rng(3)
  n, k = 600, 4
  base = rng.uniform(size=(n, 1))
  conf = np.clip(base + np.cumsum(rng.uniform(0, 0.2, (n, k)), axis=1) - 0.3, 0, 1)
  traces = jexit.Traces(conf, rng.integers(0, 4, (n, k)), None, np.array([1.0, 2, 2, 3]))
  model, binning = jexit.fit(traces, bins="quantile", num_bins=6)
  policy = jexit.solve(model, np.array([0.02]))
  ev = jexit.evaluate(policy, traces, binning, return_per_input=True)
  bins = binning.assign(traces.exit_signal())
  c = Counters(k, 6)
  c.record_batch(bins, ev.stop_ramp[0], ev.output_ramp[0])
  np.testing.assert_array_equal(c.stop_hist, np.rint(ev.stop_hist[0] * n))
  np.testing.assert_array_equal(c.output_hist, np.rint(ev.output_hist[0] * n))
  ref = make_reference(bins, ev.stop_ramp[0], 6)
  np.testing.assert_array_equal(ref.occupancy, c.occupancy)
  assert check(ref, c).verdict == "ok"


@pytest.mark.parametrize("call, message", [
    (lambda c: c.update(3, [0]), "k: expected a ramp in [0, 3)"),
    (lambda c: c.update(0, [0, 4]), "bins: expected bins in [0, 4), got 4"),
    (lambda c: c.update(0, [0, -1]), "bins: expected bins in [0, 4), got -1"),
    (lambda c: c.update(0, [0.5]), "bins: expected integer bins"),
    (lambda c: c.update(0, [0, 1], nan=[True]), "nan: expected shape (2,)"),
    (lambda c: c.update(0, [0, 9], nan=[True, False]), "bins: expected bins in [0, 4), got 9"),
    (lambda c: c.update(0, np.array([1, 2**63], np.uint64)), "bins: expected bins"),
    (lambda c: c.record_stops([0, 3], [0, 0]), "stop_ramp: expected integer ramps in [0, 3), got 3"),
    (lambda c: c.record_stops([0, 1], [0, 2]), "output_ramp: expected ramps in [0, stop_ramp]"),
    (lambda c: c.record_stops([0, 1], [0, -1]), "output_ramp: expected integer ramps in [0, 3), got -1"),
    (lambda c: c.record_stops([0.5], [0]), "stop_ramp: expected integer ramps"),
    (lambda c: c.record_batch(np.zeros((2, 3), int), [0, 0], [0, 1]), "output_ramp"),
    (lambda c: c.record_batch(np.full((2, 3), 4), [0, 0], [0, 0]),
     "bins: expected bins in [0, 4) at the ramps inputs reached"),
    (lambda c: c.record_audit(np.zeros((2, 2), int), [0, 0]), "pred: expected shape [B, K=3]"),
    (lambda c: c.record_audit(np.zeros((2, 3), int), [0, 0]), "conf: these counters keep"),
    (lambda c: c.record_audit(np.zeros((1, 3), int), [3], conf=np.ones((1, 3))),
     "output_ramp: expected ramps in [0, 3)"),
    (lambda c: c.record_audit(np.zeros((1, 3), int), [0], conf=np.ones((1, 3)),
                              signal=np.ones((1, 3))), "signal: these counters keep no"),
])
def test_counting_errors_name_the_argument(call, message):
  c = Counters(3, 4)
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                     .replace(")", r"\)").replace("]", r"\]")):
    call(c)
  # A refused call changes nothing.
  assert c == Counters(3, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_ramps=0, num_bins=3), "num_ramps"), (dict(num_ramps=2, num_bins=True), "num_bins"),
    (dict(num_ramps=2, num_bins=3, policy_sha256="abc"), "policy_sha256"),
    (dict(num_ramps=2, num_bins=3, audit_rows=False, audit_signal=True), "audit_signal"),
])
def test_constructor_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    Counters(**kwargs)


# ----- merging -----

def test_merge_equals_counting_the_concatenated_stream():
  rng = np.random.default_rng(1)
  k, s = 3, 5
  bins, stop, out = random_stream(rng, 900, k, s)
  conf, pred, served = audit_rows(rng, 90, k)
  signal = rng.uniform(size=(90, k))
  whole = Counters(k, s, audit_signal=True)
  whole.record_batch(bins, stop, out)
  whole.record_audit(pred, served, conf=conf, signal=signal)
  parts = []
  for rows, arows in ((slice(0, 300), slice(0, 10)), (slice(300, 301), slice(10, 10)),
                      (slice(301, 900), slice(10, 90))):
    c = Counters(k, s, audit_signal=True)
    c.record_batch(bins[rows], stop[rows], out[rows])
    c.record_audit(pred[arows], served[arows], conf=conf[arows], signal=signal[arows])
    parts.append(c)
  merged = parts[0] + parts[1] + parts[2]
  assert merged == whole
  assert sum(parts) == whole
  assert parts[0] != whole  # the merge did not modify its operands
  assert parts[0].num_inputs == 300
  np.testing.assert_array_equal(merged.audit_trace()["signal"], signal)


def test_merge_refuses_different_tables_or_policies():
  a = Counters(3, 4, policy_sha256="a" * 64)
  with pytest.raises(ValueError, match=r"shape \[K, S\] = \(3, 4\) and \(3, 5\)"):
    a + Counters(3, 5, policy_sha256="a" * 64)
  with pytest.raises(ValueError, match="count different policies"):
    a + Counters(3, 4, policy_sha256="b" * 64)
  with pytest.raises(ValueError, match="count different policies"):
    a + Counters(3, 4)
  with pytest.raises(ValueError, match="keeps audited rows"):
    a + Counters(3, 4, policy_sha256="a" * 64, audit_rows=False)
  with pytest.raises(TypeError):
    a + 1


def test_audit_trace_is_a_trace():
  rng = np.random.default_rng(2)
  c = Counters(3, 4)
  conf, pred, served = audit_rows(rng, 20, 3)
  c.record_audit(pred, served, conf=conf)
  traces = jexit.Traces(**c.audit_trace(cost=np.ones(3)))
  jexit.check_traces(traces)
  np.testing.assert_array_equal(traces.pred, pred)
  assert c.audit_agree == int(np.sum(pred[np.arange(20), served] == pred[:, -1]))
  with pytest.raises(ValueError, match="keep no audited rows"):
    Counters(3, 4, audit_rows=False).audit_trace()
  # A NaN signal served with nan="continue" is kept in the counts, not in the trace.
  conf[3, 1] = np.nan
  c = Counters(3, 4)
  c.record_audit(pred, served, conf=conf)
  assert c.audit_trace()["conf"].shape == (19, 3)


# ----- the file -----

def filled(rng, k=3, s=4, n=200, audits=15, **kw):
  c = Counters(k, s, **kw)
  bins, stop, out = random_stream(rng, n, k, s)
  nan = rng.uniform(size=bins.shape) < 0.05
  c.record_batch(bins, stop, out, nan=nan)
  conf, pred, served = audit_rows(rng, audits, k)
  c.record_audit(pred, served, conf=conf if c.audit_rows else None,
                 signal=rng.uniform(size=(audits, k)) if c.audit_signal is not None else None)
  return c


@pytest.mark.parametrize("kw", [dict(), dict(audit_rows=False), dict(audit_signal=True),
                                dict(policy_sha256="0123456789abcdef" * 4)])
def test_save_load_round_trip(tmp_path, kw):
  c = filled(np.random.default_rng(4), **kw)
  path = tmp_path / "live.counts"  # any name: no ".npz" is added
  c.save(path)
  assert os.listdir(tmp_path) == ["live.counts"]
  back = Counters.load(path)
  assert back == c
  assert back.occupancy.dtype == np.int64
  (back + c).validate()


def test_save_refuses_inconsistent_counts(tmp_path):
  c = Counters(2, 3)
  c.update(0, [1, 2])  # a batch in progress: no record_stops yet
  with pytest.raises(ValueError, match="occupancy"):
    c.save(tmp_path / "c.npz")
  assert not os.listdir(tmp_path)


def _parts(c, tmp_path):
  """The header and arrays `Counters.save` writes, for tampering."""
  c.save(tmp_path / "good.npz")
  with np.load(tmp_path / "good.npz", allow_pickle=False) as data:
    header = json.loads(str(data["header"]))
    arrays = {key: data[key] for key in data.files if key != "header"}
  return header, arrays


def _tamper_header(**changes):
  def edit(header, arrays):
    header.update(changes)
  return edit


def _tamper_array(key, fn):
  def edit(header, arrays):
    arrays[key] = fn(arrays[key])
  return edit


def _drop(key):
  def edit(header, arrays):
    del arrays[key]
  return edit


def _shift_stop(header, arrays):
  arrays["stop_hist"] = arrays["stop_hist"].copy()
  arrays["stop_hist"][0] += 1
  arrays["output_hist"] = arrays["output_hist"].copy()
  arrays["output_hist"][0] += 1
  header["num_inputs"] += 1


def _late_output(header, arrays):
  out = np.zeros_like(arrays["output_hist"])
  out[-1] = header["num_inputs"]  # every output at the last ramp: after most stops
  arrays["output_hist"] = out


def _disagree_row(header, arrays):
  pred = arrays["audit_pred"].copy()
  pred[:, -1] = pred[np.arange(len(pred)), arrays["audit_output"]]  # all agree now
  arrays["audit_pred"] = pred


def _move_occupancy(header, arrays):
  occ = arrays["occupancy"].copy()
  occ[1, 0] += 1
  arrays["occupancy"] = occ


CORRUPTIONS = {
    "wrong shape": (_tamper_array("occupancy", lambda a: a[:, :-1]),
                    r"occupancy: expected shape \(3, 4\) \(from the header\), got shape \(3, 3\)"),
    "negative count": (_tamper_array("nan", lambda a: a - 100), "nan: expected counts >= 0"),
    "float counts": (_tamper_array("stop_hist", lambda a: a.astype(float)),
                     "stop_hist: expected integers, got dtype float64"),
    "stop sum": (_tamper_array("stop_hist", lambda a: a + 1),
                 "stop_hist: expected counts summing to num_inputs"),
    "occupancy rows": (_move_occupancy, r"occupancy: expected occupancy\[1\].sum\(\) \+ nan\[1\]"),
    "output after stop": (_late_output, "output_hist: expected at most"),
    "rows and occupancy": (_shift_stop, r"occupancy: expected occupancy\[0\]"),
    "agree above audited": (_tamper_header(audit_agree=16), "header.audit_agree|audit_agree: "
                            "expected at most audited"),
    "audited above inputs": (_tamper_header(audited=10**6, audit_rows=False),
                             "audit_conf|audited: expected at most num_inputs"),
    "rows disagree": (_disagree_row, r"audit_agree: expected 15 \(the audited rows"),
    "unknown key": (lambda h, a: a.update(extra=np.zeros(3)), r"unknown key\(s\) \['extra'\]"),
    "missing key": (_drop("nan"), r"missing key\(s\) \['nan'\]"),
    "unknown header field": (_tamper_header(owner="x"), r"header: unknown field\(s\) \['owner'\]"),
    "format": (_tamper_header(format="jexit-policy"), "header.format: expected 'jexit-counters'"),
    "version": (_tamper_header(format_version=2), "upgrade jexit"),
    "bool count": (_tamper_header(num_inputs=True), "header.num_inputs: expected int"),
    "bad digest": (_tamper_header(policy_sha256="xyz"), "header.policy_sha256"),
    "huge claimed K*S": (_tamper_header(num_ramps=4000, num_bins=10**6),
                         "header.num_ramps, num_bins: expected K"),
    "huge claimed rows": (_tamper_header(audited=10**12), "header.audited: 1000000000000 audited"),
    "pickled member": (_tamper_array("audit_conf", lambda a: a.astype(object)),
                       "audit_conf: expected floating-point values, got dtype object"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_load_refuses_corrupt_files(tmp_path, name):
  edit, message = CORRUPTIONS[name]
  header, arrays = _parts(filled(np.random.default_rng(5)), tmp_path)
  edit(header, arrays)
  path = tmp_path / "c.npz"
  with open(path, "wb") as f:
    np.savez(f, header=np.array(json.dumps(header)), **arrays)
  with pytest.raises(ValueError, match=message) as info:
    Counters.load(path)
  assert str(info.value).startswith(f"counters file {path}: ")


def test_load_refuses_non_zip_and_bad_json(tmp_path):
  path = tmp_path / "c.npz"
  path.write_bytes(b"\x80\x04not a zip at all")
  with pytest.raises(ValueError, match="could not read it as a .npz"):
    Counters.load(path)
  with pytest.raises(ValueError, match="could not read it"):
    Counters.load(tmp_path / "missing.npz")
  with open(path, "wb") as f:
    np.savez(f, header=np.array("{not json"))
  with pytest.raises(ValueError, match="header: not valid JSON"):
    Counters.load(path)
  with open(path, "wb") as f:
    np.savez(f, occupancy=np.zeros((1, 1)))
  with pytest.raises(ValueError, match="missing key 'header'"):
    Counters.load(path)


def _raw_npy(shape, dtype="<i8", data=b""):
  header = {"descr": dtype, "fortran_order": False, "shape": shape}
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, header)
  return buf.getvalue() + data


@pytest.mark.parametrize("member, shape, message", [
    ("occupancy", (10**6, 10**6), r"occupancy: expected shape \(3, 4\)"),
    ("header", (), "header: 100000000 values exceed"),
])
def test_huge_claimed_member_is_refused_before_allocating(tmp_path, monkeypatch, member,
                                                          shape, message):
  header, arrays = _parts(filled(np.random.default_rng(6)), tmp_path)
  path = tmp_path / "c.npz"
  with zipfile.ZipFile(path, "w") as z:
    if member == "header":  # a unicode scalar of 10^8 characters
      z.writestr("header.npy", _raw_npy((), "<U100000000"))
    else:
      z.writestr("header.npy", _npy(np.array(json.dumps(header))))
    for key, a in arrays.items():
      z.writestr(key + ".npy", _raw_npy(shape) if key == member else _npy(a))
  read = []
  real = np.lib.format.read_array
  monkeypatch.setattr(np.lib.format, "read_array",
                      lambda f, **kw: read.append(f.name) or real(f, **kw))
  start = time.perf_counter()
  with pytest.raises(ValueError, match=message):
    Counters.load(path)
  assert time.perf_counter() - start < 5
  assert f"{member}.npy" not in read  # refused from its .npy header alone


def _npy(a):
  buf = io.BytesIO()
  np.lib.format.write_array(buf, a, allow_pickle=False)
  return buf.getvalue()


def test_policy_sha256_identifies_a_policy(tmp_path):
  from jexit.runtime import read_policy_arrays
  rng = np.random.default_rng(7)
  traces = jexit.Traces(rng.uniform(size=(300, 3)), rng.integers(0, 3, (300, 3)), None,
                        np.ones(3))
  model, binning = jexit.fit(traces, bins="quantile", num_bins=4)
  policy = jexit.solve(model, np.array([0.01, 0.3]))
  digests = []
  for i in (0, 0, 1):
    jexit.export_policy(tmp_path / "p.npz", policy, binning, model, i)
    header, edges, loss, threshold, cost, _, _ = read_policy_arrays(tmp_path / "p.npz")
    digests.append(monitor.policy_sha256(header, dict(edges=edges, loss=loss,
                                                      threshold=threshold, cost=cost)))
  assert digests[0] == digests[1] != digests[2]
  assert len(digests[0]) == 64


# ----- special functions against scipy -----

def test_gammaincc_and_chi2_sf_against_scipy():
  for a in (0.5, 1.0, 2.5, 7.0, 30.0, 250.0, 5000.0):
    for x in np.concatenate([[1e-8, 0.1], np.array([0.5, 0.9, 1.0, 1.1, 2.0, 5.0, 20.0]) * a,
                             [a + 1 - 1e-9, a + 1]]):
      got, want = monitor.gammaincc(a, x), special.gammaincc(a, x)
      assert got == pytest.approx(want, rel=1e-9, abs=1e-300), (a, x)
  for df in (1, 2, 5, 15, 63, 1000):
    for g in (0.0, 0.01, 1.0, df * 0.5, df, df * 3.0, df + 100.0, 2000.0):
      assert monitor.chi2_sf(g, df) == pytest.approx(stats.chi2.sf(g, df), rel=1e-9,
                                                     abs=1e-300), (g, df)
  assert monitor.chi2_sf(3.0, 0) == 1.0
  assert monitor.chi2_sf(1e6, 3) == 0.0


def test_betainc_beta_ppf_clopper_pearson_and_binomial_tail_against_scipy():
  for a, b in ((0.5, 0.5), (1, 1), (2, 30), (30, 2), (1, 10**5), (300, 700), (5000, 10**6)):
    for x in (1e-9, 1e-4, 0.01, 0.3, 0.5, 0.9, 0.999):
      assert monitor.betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-9,
                                                       abs=1e-300), (a, b, x)
    for q in (1e-6, 0.01, 0.5, 0.99):
      assert monitor.beta_ppf(q, a, b) == pytest.approx(stats.beta.ppf(q, a, b), rel=1e-9), \
          (q, a, b)
  for d, n in ((0, 10), (3, 10), (10, 10), (0, 1), (1, 1), (17, 2000), (1999, 2000),
               (500, 100000)):
    for alpha in (0.001, 0.01, 0.05):
      lower, upper = monitor.clopper_pearson(d, n, alpha)
      want_lower = 0.0 if d == 0 else stats.beta.ppf(alpha, d, n - d + 1)
      want_upper = 1.0 if d == n else stats.beta.ppf(1 - alpha, d + 1, n - d)
      assert lower == pytest.approx(want_lower, rel=1e-9, abs=1e-300), (d, n, alpha)
      assert upper == pytest.approx(want_upper, rel=1e-9), (d, n, alpha)
    for eps in (0.001, 0.02, 0.3):
      assert monitor.binom_sf_ge(d, n, eps) == pytest.approx(
          stats.binom.sf(d - 1, n, eps), rel=1e-9, abs=1e-300), (d, n, eps)
  assert monitor.clopper_pearson(0, 0, 0.01) == (0.0, 1.0)


def test_g_test_against_scipy():
  rng = np.random.default_rng(8)
  for trial in range(30):
    c = int(rng.integers(2, 12))
    ref = rng.poisson(rng.uniform(0, 30, c))
    live = rng.poisson(rng.uniform(0, 300, c))
    ref[rng.integers(0, c)] = 0  # empty categories, on one side or both
    live[rng.integers(0, c)] = 0
    if trial % 3 == 0:
      ref[0] = live[0] = 0
    g, df = monitor.g_test(ref, live)
    hit = (ref + live) > 0
    table = np.stack([ref, live])[:, hit]
    if table.shape[1] < 2 or table.sum(1).min() == 0:
      assert (g, df) == (0.0, 0) or df == 0
      continue
    want_g, want_p, want_df, expected = stats.chi2_contingency(
        table, correction=False, lambda_="log-likelihood")
    assert g == pytest.approx(want_g, rel=1e-10, abs=1e-12)
    assert df == want_df
    assert monitor.chi2_sf(g, df) == pytest.approx(want_p, rel=1e-8, abs=1e-300)
    # The same G as a goodness of fit to the table's expected counts.
    pd_g, pd_p = stats.power_divergence(table.ravel(), expected.ravel(),
                                        ddof=table.size - 1 - df, lambda_="log-likelihood")
    assert g == pytest.approx(pd_g, rel=1e-10, abs=1e-12)
    assert monitor.chi2_sf(g, df) == pytest.approx(pd_p, rel=1e-8, abs=1e-300)
  assert monitor.g_test([0, 0], [3, 4]) == (0.0, 0)
  assert monitor.g_test([5, 0], [3, 0]) == (0.0, 0)


def test_total_variation_and_holm():
  assert monitor.total_variation([10, 10, 0], [0, 5, 5]) == pytest.approx(0.5)
  assert monitor.total_variation([1, 3], [2, 6]) == 0.0
  np.testing.assert_allclose(monitor.holm([0.01, 0.04, 0.03, 0.005]),
                             [0.03, 0.06, 0.06, 0.02])
  np.testing.assert_allclose(monitor.holm([0.5, 0.9]), [1.0, 1.0])
  np.testing.assert_allclose(monitor.holm([0.2, 0.01, 0.3]), [0.4, 0.03, 0.4])


# ----- the verdict -----

def hand_reference():
  occupancy = np.array([[40, 30, 20, 10], [10, 20, 20, 10], [5, 5, 10, 10]])
  stop_hist = np.array([40, 30, 30])
  return Reference(occupancy, stop_hist, 100, max_loss=0.05, certificate={"eps": 0.05})


def counters_from_counts(occupancy, stop_hist, output_hist=None, audited=0, agree=0):
  c = Counters(occupancy.shape[0], occupancy.shape[1], audit_rows=False)
  c.occupancy = np.asarray(occupancy, np.int64)
  c.stop_hist = np.asarray(stop_hist, np.int64)
  c.output_hist = np.asarray(stop_hist if output_hist is None else output_hist, np.int64)
  c.num_inputs = int(c.stop_hist.sum())
  c.audited, c.audit_agree = audited, agree
  return c.validate()


def test_verdict_ok_on_identical_proportions():
  ref = hand_reference()
  live = counters_from_counts(ref.occupancy * 50, ref.stop_hist * 50, audited=400, agree=390)
  report = check(ref, live)
  assert report.verdict == "ok" and report.exit_code == 0
  assert report.drifted == ()
  for t in report.ramps + (report.stops,):
    assert t.statistic == pytest.approx(0.0, abs=1e-9) and t.p_value == pytest.approx(1.0)
    assert t.effect == pytest.approx(0.0, abs=1e-12) and not t.drift
  assert report.budget.rate == pytest.approx(10 / 400)
  assert report.budget.lower < 0.05 and not report.budget.exceeded
  assert report.certificate == {"eps": 0.05}
  d = report.to_dict()
  assert json.loads(json.dumps(d, allow_nan=False)) == d
  assert d["ramps"][0]["live"] == 5000 and d["budget"]["audited"] == 400


def test_verdict_drift_names_the_shifted_ramp():
  ref = hand_reference()
  occupancy = ref.occupancy * 50
  occupancy[1] = np.array([25, 20, 10, 5]) * 50  # same inputs reach ramp 1, other bins
  report = check(ref, counters_from_counts(occupancy, ref.stop_hist * 50))
  assert report.verdict == "drift" and report.exit_code == 1
  assert report.drifted == (1,)
  assert [t.drift for t in report.ramps] == [False, True, False] and not report.stops.drift
  assert report.ramps[1].effect == pytest.approx(0.25) and report.ramps[1].df == 3
  assert report.ramps[1].p_adjusted <= 0.01
  assert report.budget is not None and report.budget.audited == 0  # from reference.max_loss
  assert not report.budget.exceeded and report.budget.upper == 1.0


def test_stop_histogram_drift():
  ref = hand_reference()
  stop_hist = np.array([40, 10, 50]) * 50
  occupancy = np.array([[40, 30, 20, 10], [10, 20, 20, 10], [10, 10, 15, 15]]) * 50
  report = check(ref, counters_from_counts(occupancy, stop_hist))
  assert report.stops.drift and report.verdict == "drift"
  assert report.stops.effect == pytest.approx(0.2)


def test_trivial_shift_on_a_long_stream_is_not_drift():
  ref = hand_reference()._replace(occupancy=hand_reference().occupancy * 10**4,
                                  stop_hist=hand_reference().stop_hist * 10**4,
                                  num_inputs=10**6)
  occupancy = ref.occupancy.copy()
  occupancy[0] += np.array([-10000, 10000, 0, 0])  # 1% of ramp 0's inputs moved
  live = counters_from_counts(occupancy, ref.stop_hist)
  report = check(ref, live)
  assert report.ramps[0].p_adjusted < 1e-6 and report.ramps[0].effect == pytest.approx(0.01)
  assert report.verdict == "ok"
  assert check(ref, live, min_effect=0.0).drifted == (0,)


def test_verdict_budget_exceeded_only_on_evidence():
  ref = hand_reference()
  occ, stops = ref.occupancy * 50, ref.stop_hist * 50
  report = check(ref, counters_from_counts(occ, stops, audited=500, agree=400))  # 20% > 5%
  assert report.verdict == "budget exceeded" and report.exit_code == 1
  assert report.budget.lower > 0.05 and report.budget.exceeded
  assert report.budget.p_value < 0.01
  # A few audits at 10%: the upper bound is above eps, but no evidence of excess.
  report = check(ref, counters_from_counts(occ, stops, audited=30, agree=27))
  assert report.verdict == "ok" and report.budget.upper > 0.05 > report.budget.lower
  # max_loss overrides the reference's; drift and excess together: excess wins.
  drifted = occ.copy()
  drifted[0] = np.array([10, 10, 10, 70]) * 50
  report = check(ref, counters_from_counts(drifted, stops, audited=500, agree=480),
                 max_loss=0.01)
  assert report.verdict == "budget exceeded" and report.drifted == (0,)
  assert check(ref, counters_from_counts(drifted, stops, audited=500, agree=480),
               max_loss=0.1).verdict == "drift"
  assert check(ref._replace(max_loss=None), counters_from_counts(occ, stops)).budget is None


def test_nan_signals_are_a_category():
  ref = hand_reference()
  c = counters_from_counts(ref.occupancy * 50, ref.stop_hist * 50)
  c.occupancy[0, 0] -= 1000
  c.nan[0] = 1000
  report = check(ref, c.validate())
  assert report.drifted == (0,) and report.ramps[0].df == 4
  assert report.ramps[0].effect == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.0), r"alpha: expected a value in \(0, 1\)"),
    (dict(alpha=True), "alpha"), (dict(min_effect=1.5), "min_effect"),
    (dict(max_loss=-0.1), "max_loss"), (dict(policy_sha256="f" * 64), "counted policy None"),
])
def test_check_argument_errors(kwargs, message):
  ref = hand_reference()
  with pytest.raises(ValueError, match=message):
    check(ref, counters_from_counts(ref.occupancy, ref.stop_hist), **kwargs)


def test_check_refuses_mismatched_inputs():
  ref = hand_reference()
  with pytest.raises(ValueError, match=r"expected shape \[K, S\] = \(3, 4\)"):
    check(ref, Counters(3, 5))
  with pytest.raises(ValueError, match="reference.stop_hist: expected counts summing"):
    check(ref._replace(num_inputs=99), Counters(3, 4))
  with pytest.raises(ValueError, match=r"reference.occupancy: expected row 2"):
    extra = np.zeros((3, 4), int)
    extra[2, 0] = 1
    check(ref._replace(occupancy=ref.occupancy + extra), Counters(3, 4))
  with pytest.raises(ValueError, match="reference.max_loss"):
    check(ref._replace(max_loss=2.0), Counters(3, 4))
  with pytest.raises(ValueError, match="reference.certificate: expected a JSON-ready"):
    check(ref._replace(certificate={"eps": np.float32(0.1)}), Counters(3, 4))
  with pytest.raises(ValueError, match="counters: expected jexit.monitor.Counters"):
    check(ref, {"occupancy": ref.occupancy})


def test_reference_dict_round_trip_and_errors():
  ref = hand_reference()
  d = json.loads(json.dumps(ref.to_dict()))
  back = monitor.reference_from_dict(d)
  np.testing.assert_array_equal(back.occupancy, ref.occupancy)
  assert back._replace(occupancy=None, stop_hist=None) == ref._replace(occupancy=None,
                                                                        stop_hist=None)
  with pytest.raises(ValueError, match="reference: expected keys"):
    monitor.reference_from_dict({**d, "extra": 1})
  with pytest.raises(ValueError, match="reference.occupancy: expected a rectangular"):
    monitor.reference_from_dict({**d, "occupancy": [[1, 2], [3]]})
  with pytest.raises(ValueError, match="reference.occupancy: expected integers"):
    monitor.reference_from_dict({**d, "occupancy": [["a"] * 4] * 3})
  with pytest.raises(ValueError, match="counters.nan: a reference"):
    filled(np.random.default_rng(0)).reference()


# ----- false alarms and power (Monte Carlo) -----

def test_false_alarm_rate_at_most_alpha():
  # Fit rows and live streams drawn from the same law: "drift" at most alpha
  # of the time (+ 3 Monte Carlo standard errors), even with min_effect = 0;
  # and the same for "budget exceeded" when the live loss is exactly eps.
  rng = np.random.default_rng(9)
  k, s, alpha, reps = 3, 8, 0.05, 300
  draw = law(rng, k, s)
  drift = budget = 0
  pvals = []
  for rep in range(reps):
    ref_bins, ref_stop = draw(rng, 2000)
    live_bins, live_stop = draw(rng, int(rng.choice([200, 2000, 20000])))
    live = live_counters(live_bins, live_stop, s, audit_rows=False)
    live.audited = min(int(rng.choice([50, 500, 5000])), live.num_inputs)
    live.audit_agree = live.audited - int(rng.binomial(live.audited, 0.05))
    report = check(make_reference(ref_bins, ref_stop, s), live, alpha=alpha, min_effect=0.0,
                   max_loss=0.05)
    drift += report.verdict == "drift" or bool(report.drifted) or report.stops.drift
    budget += report.budget.exceeded
    pvals.append(report.ramps[0].p_value)
  slack = 3 * np.sqrt(alpha * (1 - alpha) / reps)
  assert drift / reps <= alpha + slack
  assert budget / reps <= alpha + slack
  # The unadjusted p-values are close to uniform (the test is not just blunt).
  assert 0.5 * alpha <= np.mean(np.array(pvals) <= alpha) <= alpha + slack


def test_detects_a_shift():
  rng = np.random.default_rng(10)
  k, s = 3, 8
  draw = law(rng, k, s)
  ref_bins, ref_stop = draw(rng, 2000)
  reference = make_reference(ref_bins, ref_stop, s)
  found = 0
  for rep in range(20):
    bins, stop = draw(rng, 2000)
    bins[:, 0] = np.minimum(bins[:, 0] + (rng.uniform(size=2000) < 0.3), s - 1)  # 30% up a bin
    found += check(reference, live_counters(bins, stop, s)).ramps[0].drift
  assert found == 20


def test_one_sample_test_against_the_fit_rows_would_false_alarm():
  # Why `g_test` is two-sample: taking the fit rows' proportions as exact
  # (smoothed, one-sample G) ignores their sampling noise, and a long live
  # stream from the very same law is flagged most of the time.
  rng = np.random.default_rng(11)
  s, alpha, reps = 8, 0.01, 100
  p = rng.dirichlet(np.ones(s))
  one = two = 0
  for _ in range(reps):
    ref, live = rng.multinomial(1000, p), rng.multinomial(200_000, p)
    smoothed = (ref + 0.5) / (ref.sum() + 0.5 * s)
    _, p_one = stats.power_divergence(live, smoothed * live.sum(), lambda_="log-likelihood")
    one += p_one <= alpha
    two += monitor.chi2_sf(*monitor.g_test(ref, live)) <= alpha
  assert one / reps > 0.5
  assert two / reps <= alpha + 3 * np.sqrt(alpha / reps)


# ----- the module itself -----

def test_docstring_examples():
  result = doctest.testmod(monitor, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0


def test_module_needs_only_numpy():
  # Loaded as a standalone file (how a server may vendor it beside runtime.py).
  path = os.path.join(ROOT, "jexit", "monitor.py")
  code = ("import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('mon', {path!r})\n"
          "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
          "bad = [m for m in ('jax', 'scipy', 'torch') if m in sys.modules]\n"
          "assert not bad, bad\n"
          "assert not any(m.startswith('jexit') for m in sys.modules)\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr


def test_sparse_cells_use_the_exact_conditional_p_value():
  """Few counts: the simulated p-value equals the exact conditional one
  (all live rows enumerated, multivariate hypergeometric weights)."""
  import itertools
  ref, live = np.array([3, 1, 0, 4]), np.array([0, 2, 2, 1])
  g, df, p = monitor.g_test_pvalue(ref, live)
  col, n_live = ref + live, live.sum()
  exact, total = 0.0, special.comb(col.sum(), n_live)
  for row in itertools.product(*(range(c + 1) for c in col)):
    if sum(row) != n_live:
      continue
    w = np.prod([special.comb(c, r) for c, r in zip(col, row)]) / total
    if monitor.g_test(col - np.array(row), row)[0] >= g - 1e-9:
      exact += w
  assert df == 3 and abs(p - exact) < 0.015, (p, exact)
  assert monitor.g_test_pvalue(ref, live) == (g, df, p)  # seeded by the counts
  # plenty of counts: the chi-square tail
  big_ref, big_live = ref * 100 + 50, live * 100 + 50
  g, df, p = monitor.g_test_pvalue(big_ref, big_live)
  assert p == monitor.chi2_sf(g, df)


def test_false_alarm_rate_with_a_sparsely_reached_ramp():
  """Same-law counts of ~45 inputs in 6 bins (a ramp few inputs reach): the
  chi-square tail alone rejected ~8% of the time at level 5%; the simulated
  exact p-value keeps the rate at most alpha."""
  rng = np.random.default_rng(1)
  probs = np.array([0.04, 0.35, 0.43, 0.03, 0.11, 0.04])
  rejected, trials = 0, 800
  for _ in range(trials):
    a, b = (np.bincount(rng.choice(6, rng.binomial(1500, 0.03), p=probs), minlength=6)
            for _ in range(2))
    rejected += monitor.g_test_pvalue(a, b, simulations=1999)[2] <= 0.05
  # mean 40 and sd 6.2 at rate 0.05; the chi-square tail gave ~66
  assert rejected <= 0.05 * trials + 2.3 * np.sqrt(0.05 * 0.95 * trials), rejected
