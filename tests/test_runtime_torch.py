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


def test_runner_on_digits_vgg(tmp_path):
  """The experiments' early-exit VGG (untrained, narrow, to stay fast) on real
  digits images: compacted float32 batches decide as the numpy runtime does on
  the confidences of a full-batch pass."""
  ee_vgg = pytest.importorskip("experiments.ee_vgg")
  torch.manual_seed(0)
  net = ee_vgg.build_model("vgg11", ramps=3, width_div=16).eval()
  with torch.no_grad():  # spread the near-uniform softmax of untrained heads
    for head, scale in zip(net.heads, (10.0, 30.0, 100.0)):
      head[-1].weight.mul_(scale)
  images = ee_vgg.load_digits_images().images[:256]
  conf, pred = full_trace(net.segments, net.heads, images)
  traces = jexit.Traces(conf, pred, None, ee_vgg.segment_flops(net).astype(np.float64))
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
  out = EarlyExitRunner(net.segments, net.heads, table)(images)
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
