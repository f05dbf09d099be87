"""EarlyExitRunner: same decisions as the numpy runtime, compacted batches."""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jexit  # noqa: E402
from jexit import export  # noqa: E402
from jexit.runtime import ExitTable  # noqa: E402
from jexit.runtime_torch import EarlyExitRunner, max_softmax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Counting(torch.nn.Module):
  """Wraps a module and records the batch sizes it ran on."""

  def __init__(self, inner):
    super().__init__()
    self.inner, self.sizes = inner, []

  def forward(self, x):
    self.sizes.append(int(x.shape[0]))
    return self.inner(x)


def tiny_model(k=4, width=6, classes=5, seed=0, dtype=torch.float64):
  """K segments (linear + tanh) and K linear heads with random weights."""
  g = torch.Generator().manual_seed(seed)
  segments, heads = [], []
  for _ in range(k):
    lin = torch.nn.Linear(width, width).to(dtype)
    head = torch.nn.Linear(width, classes).to(dtype)
    with torch.no_grad():
      for p in list(lin.parameters()) + list(head.parameters()):
        p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 1.5)
    segments.append(Counting(torch.nn.Sequential(lin, torch.nn.Tanh())).eval())
    heads.append(head.eval())
  return segments, heads


@torch.no_grad()
def full_trace(segments, heads, x):
  """conf, pred `[N, K]` (numpy) of every ramp on every input."""
  confs, preds, h = [], [], x
  for segment, head in zip(segments, heads):
    h = segment(h)
    c, p = max_softmax(head(h))
    confs.append(c.cpu().numpy())
    preds.append(p.cpu().numpy())
  return np.stack(confs, 1).astype(np.float64), np.stack(preds, 1)


def solved_table(tmp_path, conf, pred, *, recall, lam_frac, name="p.npz"):
  traces = jexit.Traces(conf, pred, None, np.array([1.0, 1.0, 2.0, 2.0])[:conf.shape[1]])
  model, binning = jexit.fit(traces, bins="quantile", num_bins=5, loss="proxy")
  policy = jexit.solve(model, np.array([lam_frac]) / traces.cost.sum(), recall=recall)
  export.export_policy(tmp_path / name, policy, binning, model, 0, traces=traces)
  return ExitTable.load(tmp_path / name, out_of_range="clip")


def assert_runner_matches(runner, x, want, every):
  """The runner's stop/output ramps and predictions equal `want` (ExitTable.run's),
  on the whole batch and, for every `every`-th input, at batch size 1."""
  want_stop, want_out, want_pred = want
  out = runner(x)
  np.testing.assert_array_equal(out.stop_ramp.numpy(), want_stop)
  np.testing.assert_array_equal(out.output_ramp.numpy(), want_out)
  np.testing.assert_array_equal(out.pred.numpy(), want_pred)
  for i in range(0, len(x), every):  # batch size 1
    one = runner(x[i:i + 1])
    assert (int(one.stop_ramp[0]), int(one.output_ramp[0])) == (want_stop[i], want_out[i])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recall", [True, False])
@pytest.mark.parametrize("lam_frac", [0.02, 0.3])
def test_runner_equals_numpy_runtime(tmp_path, device, recall, lam_frac):
  segments, heads = tiny_model()
  x = torch.randn(300, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
  conf, pred = full_trace(segments, heads, x)
  table = solved_table(tmp_path, conf, pred, recall=recall, lam_frac=lam_frac)
  want_stop, want_out, want_pred = table.run(conf, pred)
  assert len(np.unique(want_stop)) >= 3  # inputs exit at several ramps

  for m in segments + heads:
    m.to(device)
  for s in segments:
    s.sizes.clear()
  runner = EarlyExitRunner(segments, heads, table)
  out = runner(x.to(device))
  assert out.pred.device.type == device
  for i in range(0, 300, 37):  # batch size 1 takes the plain-Python path
    one = runner(x[i:i + 1].to(device))
    assert (int(one.stop_ramp[0]), int(one.output_ramp[0]), int(one.pred[0])) == (
        want_stop[i], want_out[i], want_pred[i])
    assert one.logits.shape == (1, 5) and one.pred.device.type == device
  np.testing.assert_array_equal(out.stop_ramp.cpu().numpy(), want_stop)
  np.testing.assert_array_equal(out.output_ramp.cpu().numpy(), want_out)
  np.testing.assert_array_equal(out.pred.cpu().numpy(), want_pred)
  # The logits returned are the output ramp's own, per input.
  np.testing.assert_array_equal(out.logits.argmax(-1).cpu().numpy(), want_pred)
  # Compaction: segment k ran only on the inputs that had not stopped before it.
  still = [int((want_stop >= k).sum()) for k in range(len(segments))]
  assert [s.sizes[0] if s.sizes else 0 for s in segments] == still


def test_runner_batch_independence_and_order():
  segments, heads = tiny_model(k=3)
  x = torch.randn(64, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
  conf, pred = full_trace(segments, heads, x)
  rng = np.random.default_rng(0)
  edges = np.tile(np.linspace(0, 1, 6), (3, 1))
  loss = rng.uniform(size=(3, 5)).astype(np.float32)
  threshold = np.where(rng.uniform(size=(3, 5)) < 0.5, np.sort(loss.ravel())[7], -np.inf)
  threshold[-1] = np.inf
  header = {"format": "jexit-policy", "format_version": 1, "jexit_version": "t",
            "signal": "1-conf", "lam": 0.0, "recall": True, "num_ramps": 3, "num_bins": 5,
            "cost": [1.0, 1.0, 1.0], "dtype": "float32", "trace_sha256": None}
  table = ExitTable(header, edges, loss, threshold.astype(np.float32), np.ones(3))
  runner = EarlyExitRunner(segments, heads, table, keep_logits=False)
  whole = runner(x)
  assert whole.logits is None
  assert runner(x[:0]).pred.shape == (0,)
  perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
  shuffled = runner(x[perm])
  for field in ("pred", "stop_ramp", "output_ramp"):
    np.testing.assert_array_equal(getattr(shuffled, field).numpy(),
                                  getattr(whole, field).numpy()[perm.numpy()])
  singles = [runner(x[i:i + 1]) for i in range(0, 64, 3)]  # the batch-1 path
  for field in ("pred", "stop_ramp", "output_ramp"):
    np.testing.assert_array_equal([int(getattr(o, field)[0]) for o in singles],
                                  getattr(whole, field).numpy()[::3])
  np.testing.assert_array_equal(whole.stop_ramp.numpy(), table.run(conf, pred)[0])


def test_runner_refuses_mismatches(tmp_path):
  segments, heads = tiny_model(k=4)
  x = torch.randn(50, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
  conf, pred = full_trace(segments, heads, x)
  table = solved_table(tmp_path, conf, pred, recall=True, lam_frac=0.1)
  with pytest.raises(ValueError, match="K=4 ramps, the model 3"):
    EarlyExitRunner(segments[:3], heads[:3], table)
  with pytest.raises(ValueError, match="one head per segment"):
    EarlyExitRunner(segments, heads[:3], table)
  with pytest.raises(ValueError, match="table: expected"):
    EarlyExitRunner(segments, heads, {"threshold": 1})
  with pytest.raises(ValueError, match=r"x: expected a batch \[B, ...\]"):
    EarlyExitRunner(segments, heads, table)(torch.tensor(1.0))
  heads[1].train()  # a Linear head in training mode computes the same: accepted
  EarlyExitRunner(segments, heads, table)(x)
  heads[1].eval()
  bn_segments = [torch.nn.Sequential(s, torch.nn.BatchNorm1d(6).to(torch.float64)).eval()
                 for s in segments]
  runner = EarlyExitRunner(bn_segments, heads, table)
  runner(x)
  bn_segments[2].train()
  with pytest.raises(ValueError, match=r"segments\[2\]: expected eval mode, got BatchNorm1d"):
    runner(x)
  # A table binning a custom signal needs the function that computes it.
  traces = jexit.Traces(conf, pred, None, np.ones(4), signal=1.0 - conf)
  model, binning = jexit.fit(traces, bins="quantile", num_bins=4)
  policy = jexit.solve(model, np.array([0.05]))
  export.export_policy(tmp_path / "s.npz", policy, binning, model, 0)
  with pytest.raises(ValueError, match="signal_fn"):
    EarlyExitRunner(segments, heads, tmp_path / "s.npz")
  custom = EarlyExitRunner(segments, heads, os.fspath(tmp_path / "s.npz"),
                           signal_fn=lambda z: 1.0 - max_softmax(z)[0])
  custom_table = ExitTable.load(tmp_path / "s.npz", out_of_range="clip")
  custom_table_out = custom_table.run(None, pred, signal=1.0 - conf)
  # The file's default mode is "error"; the same inputs stay within range here.
  np.testing.assert_array_equal(custom(x).stop_ramp.numpy(), custom_table_out[0])


def test_runner_per_ramp_signal_functions(tmp_path):
  # A list of K signal functions (e.g. learned exit gates): ramp k reads signal_fn[k].
  segments, heads = tiny_model(k=3)
  x = torch.randn(200, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
  conf, pred = full_trace(segments, heads, x)
  margin = [lambda z: jexit.runtime_torch.margin_signal(z),
            lambda z: 1.0 - max_softmax(z)[0] ** 2,
            lambda z: 1.0 - max_softmax(z)[0]]
  with torch.no_grad():
    logits, h = [], x
    for segment, head in zip(segments, heads):
      h = segment(h)
      logits.append(head(h))
    signal = np.stack([f(z).numpy() for f, z in zip(margin, logits)], 1)
  traces = jexit.Traces(conf, pred, None, np.ones(3), signal=signal)
  model, binning = jexit.fit(traces, bins="quantile", num_bins=6, signal_range=(0, 1),
                             loss="proxy")
  policy = jexit.solve(model, np.array([0.1 / 3]))
  export.export_policy(tmp_path / "g.npz", policy, binning, model, 0)
  table = ExitTable.load(tmp_path / "g.npz")
  want_stop, want_out, want_pred = table.run(None, pred, signal=signal)
  assert len(np.unique(want_stop)) >= 2
  assert_runner_matches(EarlyExitRunner(segments, heads, table, signal_fn=margin), x,
                        (want_stop, want_out, want_pred), every=17)
  with pytest.raises(ValueError, match=r"signal_fn: expected one function per ramp \(K=3\), got 2"):
    EarlyExitRunner(segments, heads, table, signal_fn=margin[:2])
  with pytest.raises(ValueError, match="signal_fn: expected a function"):
    EarlyExitRunner(segments, heads, table, signal_fn=[margin[0], 3, margin[2]])


def test_runner_nan_logits(tmp_path):
  segments, heads = tiny_model(k=3)
  x = torch.randn(40, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
  conf, pred = full_trace(segments, heads, x)
  table = solved_table(tmp_path, conf, pred, recall=True, lam_frac=0.5)
  x_bad = x.clone()
  x_bad[3] = float("nan")
  with pytest.raises(ValueError, match=r"NaN at input \(3,\)"):
    EarlyExitRunner(segments, heads, table)(x_bad)
  safe = ExitTable.load(tmp_path / "p.npz", nan="continue", out_of_range="clip")
  out = EarlyExitRunner(segments, heads, safe)(x_bad)
  assert int(out.stop_ramp[3]) == 2 and int(out.output_ramp[3]) == 2
  one = EarlyExitRunner(segments, heads, safe)(x_bad[3:4])
  assert int(one.stop_ramp[0]) == 2 and int(one.output_ramp[0]) == 2
  with pytest.raises(ValueError, match="NaN"):
    EarlyExitRunner(segments, heads, table)(x_bad[3:4])
  good = np.ones(40, bool)
  good[3] = False
  np.testing.assert_array_equal(out.stop_ramp.numpy()[good], table.run(conf, pred)[0][good])


def test_runtime_torch_never_imports_jax():
  code = ("import sys, jexit.runtime_torch\n"
          "assert 'jax' not in sys.modules, 'jax imported'\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("batching", ["compact", "bucket", "mask"])
def test_runner_on_digits_vgg(tmp_path, batching):
  """The early-exit VGG (untrained, narrow, to stay fast) on real digits images,
  recorded by jexit.record: compacted float32 batches decide as the numpy
  runtime does on the confidences of a full-batch pass."""
  vgg = pytest.importorskip("jexit.vgg")
  vgg_traces = pytest.importorskip("jexit.vgg_traces")
  from jexit.record import record
  torch.manual_seed(0)
  net = vgg.build_model("vgg11", ramps=3, width_div=16).eval()
  with torch.no_grad():  # spread the near-uniform softmax of untrained heads
    for head, scale in zip(net.heads, (10.0, 30.0, 100.0)):
      head[-1].weight.mul_(scale)
  images = vgg_traces.load_digits_images().images[:256]
  traces = record(net.segments, net.heads, images, device="cpu", progress=False)
  conf, pred = traces.conf, traces.pred
  model, binning = jexit.fit(traces, bins="quantile", num_bins=8)
  # Random weights give no useful solved policy, so a hand-made table in the
  # same container: stop in the 4 most confident bins of each ramp.
  loss = model.loss.astype(np.float32)
  threshold = np.where(np.arange(8)[None, :] < 4, loss, -np.inf).astype(np.float32)
  threshold[-1] = np.inf
  policy = jexit.Policy(threshold=threshold[None], value=np.zeros(1), lam=np.zeros(1),
                        loss=loss, cost=traces.cost, recall=True)
  export.export_policy(tmp_path / "vgg.npz", policy, binning, None, 0, traces=traces)
  table = ExitTable.load(tmp_path / "vgg.npz", out_of_range="clip")
  want_stop, want_out, want_pred = table.run(conf, pred)
  assert np.all(np.bincount(want_stop, minlength=3) > 20)
  out = EarlyExitRunner(net.segments, net.heads, table, batching=batching)(images)
  # float32 convolutions on a smaller batch may round differently: only an
  # input whose signal sits within 1e-6 of a bin edge may decide otherwise.
  signal = 1.0 - conf
  near = np.zeros(len(images), bool)
  for k in range(table.num_ramps):
    gap = np.abs(signal[:, k:k + 1] - table.edges[k][None, 1:-1]).min(axis=1)
    near |= gap < 1e-6
  differ = ((out.stop_ramp.numpy() != want_stop) | (out.output_ramp.numpy() != want_out)
            | (out.pred.numpy() != want_pred))
  assert near.sum() <= 5 and not np.any(differ & ~near), np.flatnonzero(differ)


@pytest.mark.parametrize("signal", ["stability", "class"])
@pytest.mark.parametrize("recall", [True, False])
def test_runner_tracked_signal_table_equals_numpy_runtime(tmp_path, recall, signal):
  """'stability' and 'class' tables: the runner tracks each input's previous
  prediction and computes the table's signal from it."""
  segments, heads = tiny_model(seed=3)
  x = torch.randn(300, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
  conf, pred = full_trace(segments, heads, x)
  traces = jexit.Traces(conf, pred, None, np.array([1.0, 1.0, 2.0, 2.0]))
  model, binning = jexit.fit(traces, bins="quantile", num_bins=6, signal=signal)
  policy = jexit.solve(model, np.array([0.01]), recall=recall)
  # This random network rarely agrees with its last ramp, so the solved policy
  # runs everything; a hand-made table stops in the lower half of the bins
  # (unchanged, confident predictions) and goes on in the upper half.
  loss = np.asarray(policy.loss)
  thr = np.where(np.arange(6) < 3, loss, -np.inf)
  thr[-1] = np.inf
  policy = policy._replace(threshold=thr[None].astype(loss.dtype))
  export.export_policy(tmp_path / "s.npz", policy, binning, model, 0, traces=traces)
  table = ExitTable.load(tmp_path / "s.npz", out_of_range="clip")
  want_stop, want_out, want_pred = table.run(conf, pred)
  assert len(np.unique(want_stop)) >= 2
  changed = pred[:, 1:] != pred[:, :-1]
  assert 0 < changed.mean() < 1  # the flag differs between inputs and ramps
  assert_runner_matches(EarlyExitRunner(segments, heads, table), x,
                        (want_stop, want_out, want_pred), every=23)
  with pytest.raises(ValueError, match="signal_fn"):
    EarlyExitRunner(segments, heads, table, signal_fn=lambda z: 1.0 - max_softmax(z)[0])


# ------------------------------------------------ device-side decisions vs numpy

BATCHINGS = ["compact", "bucket", "mask"]


def random_table(conf, pred, signal, recall, seed, *, nan="error", out_of_range="clip",
                 num_bins=6, calibration=None, values=None):
  """A hand-made table over `signal`'s values: random losses and thresholds (so
  inputs stop at every ramp), inner edges drawn among the inputs' own values
  (so values sit exactly on edges, where torch's and numpy's last bits matter)."""
  rng = np.random.default_rng(seed)
  k = conf.shape[1]
  if values is None:
    values = jexit.signals.values(signal, conf, pred, calibration=calibration)
  edges = np.empty((k, num_bins + 1))
  for r in range(k):
    v = np.unique(values[:, r])
    inner = np.sort(rng.choice(v[1:-1], num_bins - 1, replace=False))
    edges[r] = np.r_[v[0], inner, v[-1]]
  loss = rng.uniform(size=(k, num_bins)).astype(np.float32)
  threshold = np.where(rng.uniform(size=(k, num_bins)) < 0.6,
                       loss[rng.integers(0, k, size=(k, num_bins)), rng.integers(0, num_bins,
                                                                             size=(k, num_bins))],
                       -np.inf).astype(np.float32)
  threshold[-1] = np.inf
  header = {"format": "jexit-policy", "format_version": 1, "jexit_version": "t",
            "signal": signal, "lam": 0.0, "recall": recall, "num_ramps": k,
            "num_bins": num_bins, "cost": [1.0] * k, "dtype": "float32",
            "trace_sha256": None}
  return ExitTable(header, edges, loss, threshold, np.ones(k), calibration=calibration,
                   nan=nan, out_of_range=out_of_range)


def device_trace(segments, heads, x):
  """`full_trace` and the logits of every ramp, on x's device."""
  conf, pred = full_trace(segments, heads, x)
  with torch.no_grad():
    logits, h = [], x
    for segment, head in zip(segments, heads):
      h = segment(h)
      logits.append(head(h))
  return conf, pred, logits


def on(device, modules):
  for m in modules:
    m.to(device)
  return modules


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batching", BATCHINGS)
@pytest.mark.parametrize("recall", [True, False])
@pytest.mark.parametrize("signal", ["1-conf", "stability", "class", "signal"])
def test_device_decisions_equal_the_numpy_runtime(device, batching, recall, signal):
  segments, heads = tiny_model(k=4, seed=7)
  on(device, segments + heads)
  x = torch.randn(400, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
  x = x.to(device)
  conf, pred, logits = device_trace(segments, heads, x)
  calibration = (np.random.default_rng(1).normal(size=(3, 2 * 5 + 3))
                 if signal == "class" else None)
  signal_fn, values = None, None
  if signal == "signal":  # a custom signal per ramp (e.g. learned gates)
    signal_fn = [lambda z: 1.0 - max_softmax(z)[0] ** 2,
                 jexit.runtime_torch.margin_signal,
                 lambda z: torch.sigmoid(z[:, 0]),
                 lambda z: 1.0 - max_softmax(z)[0]]
    values = np.stack([f(z).cpu().numpy().astype(np.float64)
                       for f, z in zip(signal_fn, logits)], 1)
  table = random_table(conf, pred, signal, recall, seed=3, calibration=calibration,
                       values=values)
  want = table.run(None if signal == "signal" else conf, pred, signal=values)
  assert len(np.unique(want[0])) == 4  # inputs stop at every ramp
  if recall:
    assert np.any(want[1] < want[0])  # and some output an earlier ramp
  runner = EarlyExitRunner(segments, heads, table, signal_fn=signal_fn, batching=batching)
  out = runner(x)
  for got, expected in zip((out.stop_ramp, out.output_ramp, out.pred), want):
    assert got.device.type == device
    np.testing.assert_array_equal(got.cpu().numpy(), expected)
  # The logits returned are the output ramp's own, per input.
  stacked = torch.stack(logits, 1).cpu()
  np.testing.assert_array_equal(out.logits.cpu().numpy(),
                                stacked[torch.arange(400), torch.as_tensor(want[1])].numpy())
  if batching == "compact":
    for i in range(0, 400, 41):  # batch size 1: the plain-Python path
      one = runner(x[i:i + 1])
      assert (int(one.stop_ramp[0]), int(one.output_ramp[0]), int(one.pred[0])) == (
          want[0][i], want[1][i], want[2][i])


def test_class_values_on_edges_are_numpy_s():
  # Edges drawn among the inputs' own class-signal values: torch's exp/log differ
  # from numpy's in the last bit for some inputs, which would flip those inputs'
  # bins; the runner recomputes values within 1e-12 of an edge in numpy.
  segments, heads = tiny_model(k=4, seed=7)
  x = torch.randn(2000, 6, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
  conf, pred, _ = device_trace(segments, heads, x)
  calibration = np.random.default_rng(2).normal(size=(3, 13))
  values = jexit.signals.values("class", conf, pred, calibration=calibration)
  torch_values = np.stack([jexit.signals.REGISTRY["class"].ramp(
      k, torch.from_numpy(conf[:, k]), torch.from_numpy(pred[:, k]),
      None if k == 0 else torch.from_numpy(pred[:, k - 1]),
      torch.from_numpy(calibration), torch).numpy() for k in range(4)], 1)
  assert np.any(torch_values != values)  # the case this guards against occurs here
  table = random_table(conf, pred, "class", True, seed=4, num_bins=40, calibration=calibration)
  want = table.run(conf, pred)
  for batching in BATCHINGS:
    out = EarlyExitRunner(segments, heads, table, batching=batching)(x)
    np.testing.assert_array_equal(out.stop_ramp.numpy(), want[0])
    np.testing.assert_array_equal(out.output_ramp.numpy(), want[1])


@pytest.mark.parametrize("batching", BATCHINGS)
def test_fixed_shape_modes_run_few_shapes(batching):
  segments, heads = tiny_model(k=4, seed=7)
  x = torch.randn(300, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
  conf, pred, _ = device_trace(segments, heads, x)
  table = random_table(conf, pred, "1-conf", True, seed=5)
  want = table.run(conf, pred)
  for s in segments:
    s.sizes.clear()
  out = EarlyExitRunner(segments, heads, table, batching=batching)(x)
  np.testing.assert_array_equal(out.stop_ramp.numpy(), want[0])
  sizes = [s.sizes[0] for s in segments if s.sizes]
  going = [int((want[0] >= k).sum()) for k in range(4)]
  if batching == "compact":
    assert sizes == going
  elif batching == "bucket":  # the next power of two, at most the batch
    assert sizes == [min(1 << (n - 1).bit_length(), 300) for n in going]
  else:
    assert sizes == [300] * 4
  runner = EarlyExitRunner(segments, heads, table, batching="bucket", bucket_sizes=[50, 100])
  for s in segments:
    s.sizes.clear()
  out = runner(x)
  np.testing.assert_array_equal(out.output_ramp.numpy(), want[1])
  assert all(s.sizes[0] in (50, 100, 300) or s.sizes[0] > 100 for s in segments if s.sizes)
  with pytest.raises(ValueError, match="batching: expected one of"):
    EarlyExitRunner(segments, heads, table, batching="pad")
  with pytest.raises(ValueError, match="bucket_sizes: expected ints >= 1 with batching='bucket'"):
    EarlyExitRunner(segments, heads, table, bucket_sizes=[8])


@pytest.mark.parametrize("batching", BATCHINGS)
def test_errors_name_the_ramp_and_the_input_of_the_batch(batching):
  # An out-of-range signal at ramp 1, on inputs that ramp 0 did not stop: the
  # error names the input's index in the batch, not in the compacted rows.
  segments, heads = tiny_model(k=3, seed=7)
  x = torch.randn(200, 6, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
  conf, pred, logits = device_trace(segments, heads, x)
  cut = float(torch.quantile(logits[1][:, 0], 0.8))
  flagged = (logits[1][:, 0] > cut).numpy()
  fns = [lambda z: 1.0 - max_softmax(z)[0],
         lambda z: torch.where(z[:, 0] > cut, 5.0, 1.0 - max_softmax(z)[0]),
         lambda z: 1.0 - max_softmax(z)[0]]
  values = 1.0 - conf
  table = random_table(conf, pred, "signal", True, seed=6, values=values,
                       out_of_range="error")
  stop0 = table.run(None, pred, signal=values)[0] == 0
  bad = np.flatnonzero(flagged & ~stop0)
  assert bad.size and bad[0] > 0 and np.any(stop0[:bad[0]])  # compaction moves it
  with pytest.raises(ValueError, match=rf"signal at ramp 1: expected values in the edges' "
                                       rf"range .* got .*5\.0\)? at input \({bad[0]},\)"):
    EarlyExitRunner(segments, heads, table, signal_fn=fns, batching=batching)(x)
  # NaN: named too, or run on to the next ramp with nan="continue".
  nan_fns = [fns[0], lambda z: torch.where(z[:, 0] > cut, float("nan"), 1.0 - max_softmax(z)[0]),
             fns[2]]
  with pytest.raises(ValueError, match=rf"signal at ramp 1: expected finite values, got NaN at "
                                       rf"input \({bad[0]},\)"):
    EarlyExitRunner(segments, heads, table, signal_fn=nan_fns, batching=batching)(x)
  lenient = random_table(conf, pred, "signal", True, seed=6, values=values, nan="continue")
  nan_values = values.copy()
  nan_values[flagged, 1] = np.nan
  want = lenient.run(None, pred, signal=nan_values)
  out = EarlyExitRunner(segments, heads, lenient, signal_fn=nan_fns, batching=batching)(x)
  np.testing.assert_array_equal(out.stop_ramp.numpy(), want[0])
  np.testing.assert_array_equal(out.output_ramp.numpy(), want[1])
