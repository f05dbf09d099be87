"""jexit.counters and jexit.counters_file: counting, merging, the counters file."""

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

import jexit
from jexit import counters as counters_mod
from jexit.counters import Counters, policy_sha256
from jexit.monitor import check, make_reference

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
    digests.append(policy_sha256(header, dict(edges=edges, loss=loss,
                                                      threshold=threshold, cost=cost)))
  assert digests[0] == digests[1] != digests[2]
  assert len(digests[0]) == 64


# ----- the modules themselves -----

def test_docstring_examples():
  result = doctest.testmod(counters_mod, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0


def test_monitoring_modules_need_only_numpy():
  # jexit/counters.py, counters_file.py, stats.py and monitor.py without the
  # rest of the package (how a server may vendor them beside runtime.py).
  code = ("import sys, types\n"
          "pkg = types.ModuleType('jexit')\n"
          f"pkg.__path__ = [{os.path.join(ROOT, 'jexit')!r}]\n"
          "sys.modules['jexit'] = pkg\n"
          "import jexit.monitor\n"
          "bad = [m for m in ('jax', 'scipy', 'torch') if m in sys.modules]\n"
          "assert not bad, bad\n"
          "mods = sorted(m for m in sys.modules if m.startswith('jexit.'))\n"
          "assert mods == ['jexit.counters', 'jexit.counters_file', 'jexit.monitor',\n"
          "                'jexit.stats'], mods\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
