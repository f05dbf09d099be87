"""jexit.record: traces of any torch early-exit model, and `jexit record`."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("tqdm")

import jexit  # noqa: E402
from jexit import signals  # noqa: E402
from jexit.record import count_flops, measure_latency, record  # noqa: E402
from jexit.runtime_torch import max_softmax  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def one_thread():
  # The CI machine is shared; oversubscribed OpenMP threads spin and crawl.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def tiny_model(k=3, width=6, classes=5, seed=0):
  """K segments (linear + tanh) and K linear heads with random weights."""
  g = torch.Generator().manual_seed(seed)
  segments, heads = [], []
  for _ in range(k):
    lin, head = torch.nn.Linear(width, width), torch.nn.Linear(width, classes)
    with torch.no_grad():
      for p in list(lin.parameters()) + list(head.parameters()):
        p.copy_(torch.randn(p.shape, generator=g) * 1.5)
    segments.append(torch.nn.Sequential(lin, torch.nn.Tanh()))
    heads.append(head)
  return segments, heads


@torch.no_grad()
def outputs(segments, heads, x):
  """`[K]` logits of every ramp on `x`, computed directly."""
  logits, h = [], x
  for segment, head in zip(segments, heads):
    h = segment(h)
    logits.append(head(h))
  return logits


def test_record_equals_the_model_on_every_kind_of_data():
  segments, heads = tiny_model()
  x = torch.randn(70, 6, generator=torch.Generator().manual_seed(1))
  y = torch.randint(0, 5, (70,), generator=torch.Generator().manual_seed(2))
  logits = outputs(segments, heads, x)
  conf = np.stack([max_softmax(z)[0].numpy() for z in logits], 1)
  pred = np.stack([z.argmax(-1).numpy() for z in logits], 1)
  plain = record(segments, heads, x, batch_size=128, device="cpu", progress=False)
  assert plain.label is None and plain.signal is None and plain.position is None
  np.testing.assert_array_equal(plain.conf, conf)  # one batch: the very same operations
  np.testing.assert_array_equal(plain.pred, pred)
  dataset = torch.utils.data.TensorDataset(x, y)
  for data in ((x, y), dataset, torch.utils.data.DataLoader(dataset, batch_size=9)):
    t = record(segments, heads, data, batch_size=32, device="cpu", progress=False)
    # Smaller batches may round a float32 product differently.
    np.testing.assert_allclose(t.conf, conf, atol=1e-6)
    np.testing.assert_array_equal(t.pred, pred)
    np.testing.assert_array_equal(t.label, y.numpy())
  # Linear segments: 2 * 6 * 6 FLOPs (tanh is free), heads 2 * 6 * 5.
  np.testing.assert_array_equal(plain.cost, [72 + 60] * 3)
  np.testing.assert_array_equal(plain.head_cost, [60] * 3)


def test_flops_of_segments_and_heads_add_up_to_the_network():
  vgg = pytest.importorskip("jexit.vgg")
  vgg_traces = pytest.importorskip("jexit.vgg_traces")
  model = vgg.build_model("vgg13", 5, width_div=16)
  images = vgg_traces.load_digits_images().images[:8]
  t = record(model.segments, model.heads, images, batch_size=4, device="cpu", progress=False)
  assert t.conf.shape == (8, 5)
  assert t.cost.sum() == vgg.network_flops(model)
  seg, head = count_flops(model.segments, model.heads, images[:1])
  np.testing.assert_array_equal(t.cost, seg + head)
  np.testing.assert_array_equal(t.head_cost, head)
  assert np.all(seg > head)


def test_candidate_heads_at_one_position():
  # Ramp placement: two candidate heads after segment 0, one after segment 1,
  # two after the last: five trace columns, the second head of a position
  # costing its head only.
  segments, heads = tiny_model(k=3)
  extra = tiny_model(k=3, seed=5)[1]
  grouped = [[heads[0], extra[0]], heads[1], [extra[2], heads[2]]]
  x = torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
  t = record(segments, grouped, x, device="cpu", progress=False)
  np.testing.assert_array_equal(t.position, [0, 0, 1, 2, 2])
  np.testing.assert_array_equal(t.head_cost, [60] * 5)
  np.testing.assert_array_equal(t.cost, [132, 60, 132, 132, 60])
  with torch.no_grad():
    h0 = segments[0](x)
    h2 = segments[2](segments[1](h0))
  np.testing.assert_array_equal(t.pred[:, 1], extra[0](h0).argmax(-1).numpy())
  np.testing.assert_array_equal(t.pred[:, 4], heads[2](h2).argmax(-1).numpy())
  jexit.check_traces(t)
  with pytest.raises(ValueError, match=r"heads\[1\]: expected a head or a non-empty list"):
    record(segments, [heads[0], [], heads[2]], x, device="cpu", progress=False)


def test_recorded_signals():
  segments, heads = tiny_model()
  x = torch.randn(50, 6, generator=torch.Generator().manual_seed(4))
  logits = outputs(segments, heads, x)
  for name in ("margin", "entropy"):
    t = record(segments, heads, x, signal=name, device="cpu", progress=False)
    want = np.stack([signals.RECORDED[name][1](z.softmax(-1).numpy()) for z in logits], 1)
    np.testing.assert_allclose(t.signal, want, atol=1e-6)
    assert t.signal.min() >= 0 and t.signal.max() <= 1
  fns = [lambda z: z[:, 0], lambda z: z[:, 1] * 2, lambda z: -z[:, 2]]
  t = record(segments, heads, x, signal=fns, device="cpu", progress=False)
  np.testing.assert_array_equal(t.signal[:, 1], (logits[1][:, 1] * 2).numpy())
  t = record(segments, heads, x, signal=lambda z: z.sum(-1), device="cpu", progress=False)
  np.testing.assert_array_equal(t.signal[:, 2], logits[2].sum(-1).numpy())
  with pytest.raises(ValueError, match=r"signal: expected one function per ramp \(K=3\), got 2"):
    record(segments, heads, x, signal=fns[:2], device="cpu", progress=False)
  with pytest.raises(ValueError, match=r"signal: expected a \[B=50\] tensor at ramp 0"):
    record(segments, heads, x, signal=lambda z: z, device="cpu", progress=False)
  with pytest.raises(ValueError, match="signal: expected one of"):
    record(segments, heads, x, signal="variance", device="cpu", progress=False)


def test_latency_costs():
  segments, heads = tiny_model()
  x = torch.randn(10, 6)
  t = record(segments, heads, x, cost="latency", latency_batch_size=4, warmup=1, repeats=3,
             device="cpu", progress=False)
  assert np.all(t.cost > 0) and np.all(t.head_cost > 0) and np.all(t.head_cost < t.cost)
  seg_ms, head_ms = measure_latency(segments, heads, x, warmup=0, repeats=2)
  assert seg_ms.shape == (3,) and head_ms.shape == (3,) and np.all(seg_ms > 0)


def test_bad_input_is_named():
  segments, heads = tiny_model()
  x = torch.randn(10, 6)
  bad = tiny_model(classes=4, seed=1)[1]
  with pytest.raises(ValueError, match=r"heads: expected every head to give the same number "
                                       r"of classes; the first gives 5, heads\[1\] gives 4"):
    record(segments, [heads[0], bad[1], heads[2]], x, device="cpu", progress=False)
  with pytest.raises(ValueError, match=r"heads\[2\]: expected logits of shape \[B=10, C\], "
                                       r"got \(10,\)"):
    record(segments, heads[:2] + [lambda h: h[:, 0]], x, device="cpu", progress=False)
  with pytest.raises(ValueError, match="data: expected at least one input, got none"):
    record(segments, heads, x[:0], device="cpu", progress=False)
  with pytest.raises(ValueError, match="data: expected a tensor"):
    record(segments, heads, [1, 2, 3], device="cpu", progress=False)
  with pytest.raises(ValueError, match="data: expected integer labels"):
    record(segments, heads, (x, torch.zeros(10)), device="cpu", progress=False)
  with pytest.raises(ValueError, match=r"heads: expected one head .* per segment \(3\), got 2"):
    record(segments, heads[:2], x, device="cpu", progress=False)
  with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
    record(segments, heads, x, device="tpu", progress=False)
  if not torch.cuda.is_available():
    with pytest.raises(ValueError, match="device: expected a device this machine has"):
      record(segments, heads, x, device="cuda", progress=False)
  with pytest.raises(ValueError, match="cost: expected one of"):
    record(segments, heads, x, cost="joules", progress=False)
  with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
    record(segments, heads, x, batch_size=0, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_records_as_the_cpu_up_to_float_tolerance():
  vgg = pytest.importorskip("jexit.vgg")
  vgg_traces = pytest.importorskip("jexit.vgg_traces")
  torch.manual_seed(0)
  model = vgg.build_model("vgg11", 3, width_div=16)
  images = vgg_traces.load_digits_images().images[:64]
  cpu = record(model.segments, model.heads, images, device="cpu", progress=False)
  gpu = record(model.segments, model.heads, images, device="cuda", progress=False)
  np.testing.assert_allclose(gpu.conf, cpu.conf, atol=1e-4)
  assert (gpu.pred == cpu.pred).mean() > 0.95
  np.testing.assert_array_equal(gpu.cost, cpu.cost)


def test_cli_record_budget_export_serve(tmp_path, capsys):
  """The user's path on a tiny VGG: `jexit record`, `budget`, `export`, then the
  policy served by EarlyExitRunner decides as the numpy runtime does."""
  vgg = pytest.importorskip("jexit.vgg")
  vgg_traces = pytest.importorskip("jexit.vgg_traces")
  pytest.importorskip("sklearn")
  from jexit import cli
  from jexit.runtime import ExitTable
  from jexit.runtime_torch import EarlyExitRunner
  trace, weights, policy = tmp_path / "t.npz", tmp_path / "w.pt", tmp_path / "p.npz"
  assert cli.main(["record", "--arch", "vgg11", "--digits", "--width-div", "16", "--epochs", "2",
                   "--train-ramps", "1", "--max-images", "300", "--copies", "2", "--quiet",
                   "--threads", "1", "--save-weights", str(weights), "--out", str(trace)]) == 0
  out = capsys.readouterr().out
  assert "next: jexit budget" in out and "--block 2" in out
  t = jexit.load_traces(trace)
  assert t.num_ramps == 3 and t.num_inputs == 2 * 120 and t.head_cost is not None
  assert cli.main(["budget", str(trace), "--max-loss", "0.2", "--block", "2",
                   "--num-lambdas", "50"]) == 0
  assert cli.main(["export", str(trace), "--max-loss", "0.2", "--block", "2", "--grid", "50",
                   "--method", "solver", "--out", str(policy)]) == 0
  model = vgg.EarlyExitVGG("vgg11", (2, 3, 5), 10, width_div=16)
  assert vgg.load_weights(model, weights) == []
  model.eval()
  images = vgg_traces.load_digits_images().images[:200]
  table = ExitTable.load(policy, out_of_range="clip")
  seen = record(model.segments, model.heads, images, device="cpu", progress=False)
  want = table.run(seen.conf, seen.pred)
  got = EarlyExitRunner(model.segments, model.heads, table)(images)
  np.testing.assert_array_equal(got.stop_ramp.numpy(), want[0])
  np.testing.assert_array_equal(got.output_ramp.numpy(), want[1])
  np.testing.assert_array_equal(got.pred.numpy(), want[2])


@pytest.mark.parametrize("argv,message", [
    (["--ramps", "2,3"], "--ramps: expected 3, 5 or increasing pooling stages"),
    (["--ramps", "x"], "--ramps: expected 3, 5 or comma-separated"),
    (["--weights", "/nonexistent.pt"], "--weights: no such file"),
    (["--images", "/nonexistent"], "image folder /nonexistent: no such folder"),
    (["--device", "tpu"], "--device: expected 'cpu', 'cuda' or 'cuda:N'"),
    (["--size", "16"], "--size: expected an integer >= 32, got 16"),
    (["--trace-frac", "1.5"], "--trace-frac: expected a share in"),
])
def test_cli_record_errors_are_one_line(tmp_path, capsys, argv, message):
  from jexit import cli
  code = cli.main(["record", "--arch", "vgg11", "--out", str(tmp_path / "t.npz")] + argv)
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("jexit: error: ") and message in err
  assert err.count("\n") == 1


def test_cli_record_refuses_a_weights_file_of_another_model(tmp_path, capsys):
  vgg = pytest.importorskip("jexit.vgg")
  from jexit import cli
  path = tmp_path / "w.pt"
  torch.save(vgg.build_model("vgg11", 5, width_div=16).state_dict(), path)
  code = cli.main(["record", "--arch", "vgg11", "--width-div", "16", "--weights", str(path),
                   "--max-images", "40", "--quiet", "--out", str(tmp_path / "t.npz")])
  err = capsys.readouterr().err
  assert code == 2 and "a different --ramps, --arch or batch norm" in err
