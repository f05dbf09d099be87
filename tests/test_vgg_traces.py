"""Early-exit VGG traces (jexit.vgg, jexit.vgg_traces; learned gates: experiments/ee_vgg.py):
tiny models on the CPU."""

import dataclasses
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

import jexit  # noqa: E402
from jexit import vgg, vgg_traces  # noqa: E402
from experiments import ee_vgg  # noqa: E402
from experiments import make_traces as cli  # noqa: E402

# Few channels, few images, one epoch: seconds on one CPU core.
TINY = vgg_traces.TraceConfig(width_div=16, max_images=120, epochs=1, ramp_epochs=1,
                          copies=2, batch_size=32, seed=3)


@pytest.fixture(autouse=True)
def one_thread():
  # The CI machine is shared; oversubscribed OpenMP threads spin and crawl.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.mark.parametrize("training", ["joint", "separate"])
def test_tiny_model_writes_a_valid_trace(tmp_path, training):
  run = vgg_traces.make_traces(dataclasses.replace(TINY, training=training), device="cpu")
  path = tmp_path / "t.npz"
  jexit.save_traces(path, run.traces)
  traces = jexit.load_traces(path)
  held = 120 - len(run.train_rows)
  assert traces.conf.shape == (TINY.copies * held, 3)
  assert np.array_equal(traces.pred, run.traces.pred)
  assert np.array_equal(traces.cost, run.flops)
  # head_cost: each ramp head's part (pool 4x4 then linear to 10 classes; final: 1x1).
  channels = [v // 16 for v in vgg.tv_vgg.cfgs["A"] if v != "M"]
  np.testing.assert_array_equal(traces.head_cost, [2 * 16 * channels[1] * 10,
                                                   2 * 16 * channels[3] * 10,
                                                   2 * channels[7] * 10])
  assert traces.conf.min() >= 0 and traces.conf.max() <= 1
  assert set(np.unique(traces.label)) <= set(range(10))
  np.testing.assert_allclose(run.accuracy, (traces.pred == traces.label[:, None]).mean(0))
  assert run.agreement[-1] == 1
  assert path.stat().st_size < 100_000


def test_trace_rows_are_disjoint_from_training_rows():
  run = vgg_traces.make_traces(dataclasses.replace(TINY, epochs=0, ramp_epochs=0), device="cpu")
  assert not set(run.train_rows) & set(run.trace_source)
  # Copies of one image are consecutive rows (image-major).
  held = np.unique(run.trace_source)
  assert np.array_equal(run.trace_source, np.repeat(held, TINY.copies))
  assert len(held) + len(run.train_rows) == 120
  train, held2 = vgg_traces.split_rows(1797, 0.4, seed=0)
  assert not set(train) & set(held2) and len(train) + len(held2) == 1797


def test_self_distilled_ramps_learn_the_final_head_not_the_labels():
  # The backbone and final head learn shifted labels (y + 1) % 10; the ramps
  # then train on y. Ramps that agree with the final head learned the teacher.
  data = vgg_traces.load_digits_images()
  x, y = data.images[:128], data.labels[:128]
  agreement = {}
  for target in ("labels", "teacher"):
    torch.manual_seed(0)
    model = vgg.build_model("vgg11", 3, width_div=8)
    common = dict(training="separate", batch_size=32, augment_train=False, device="cpu")
    vgg_traces.train(model, x, (y + 1) % 10, epochs=20, ramp_epochs=0, **common)
    final = [p.detach().clone() for p in model.heads[-1].parameters()]
    vgg_traces.train(model, x, y, epochs=0, ramp_epochs=8, ramp_target=target, **common)
    torch.testing.assert_close(list(model.heads[-1].parameters()), final)  # frozen teacher
    model.eval()
    with torch.no_grad():
      pred = torch.stack([z.argmax(-1) for z in model(x)], 1)
    assert (pred[:, -1] == (y + 1) % 10).float().mean() > 0.8
    agreement[target] = (pred[:, 1] == pred[:, -1]).float().mean().item()
  assert agreement["labels"] < 0.1, agreement  # those ramps learned y
  assert agreement["teacher"] > agreement["labels"] + 0.3, agreement
  with pytest.raises(ValueError, match="ramp_target"):
    vgg_traces.train(model, x, y, epochs=0, ramp_epochs=1, ramp_target="final")


@pytest.mark.parametrize("arch", sorted(vgg.ARCHS))
@pytest.mark.parametrize("ramps", [3, 5])
def test_segment_flops_add_up_to_the_network(arch, ramps):
  model = vgg.build_model(arch, ramps, width_div=16)
  flops = vgg.segment_flops(model)
  assert flops.shape == (ramps,) and np.all(flops > 0)
  assert flops.sum() == vgg.network_flops(model)


def test_first_segment_flops_by_hand():
  # VGG-11/4, 5 ramps: conv 3->16 on 32x32 (3x3) + head pool 4x4 (the default)
  # -> linear 256->10, or pool 2x2 (experiments/traces/pool2) -> linear 64->10.
  conv = 2 * 3 * 16 * 9 * 32 * 32
  model = vgg.build_model("vgg11", 5, width_div=4)
  assert vgg.segment_flops(model)[0] == conv + 2 * 16 * 16 * 10
  model = vgg.build_model("vgg11", 5, width_div=4, head_pool=2)
  assert vgg.segment_flops(model)[0] == conv + 2 * 16 * 4 * 10


def test_five_ramps_structure_and_frozen_backbone():
  model = vgg.build_model("vgg13", 5, width_div=16)
  assert len(model.segments) == len(model.heads) == 5
  x = torch.rand(4, 1, 32, 32)
  model.eval()
  with torch.no_grad():
    logits = model(x)
    h = x
    for k, (segment, head) in enumerate(zip(model.segments, model.heads)):
      h = segment(h)
      torch.testing.assert_close(head(h), logits[k])
  assert [z.shape for z in logits] == [(4, 10)] * 5

  # separate training, ramp phase only: the backbone and final head must not move.
  before = {k: v.clone() for k, v in model.state_dict().items()}
  data = vgg_traces.load_digits_images()
  vgg_traces.train(model, data.images[:64], data.labels[:64], epochs=0, ramp_epochs=1,
            training="separate", batch_size=32, device="cpu")
  after = model.state_dict()
  for key in before:
    moved = not torch.equal(before[key], after[key])
    assert moved == (key.startswith("heads.") and not key.startswith("heads.4.")), key


def test_torchvision_state_dict_maps_onto_the_segments(tmp_path):
  cfg = [v if v == "M" else v // 16 for v in vgg.tv_vgg.cfgs["A"]]
  features = vgg.tv_vgg.make_layers(cfg, batch_norm=True).eval()
  path = tmp_path / "vgg11_bn.pt"
  torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
  model = vgg.build_model("vgg11", 3, width_div=16).eval()
  missing = vgg.load_weights(model, path)
  assert missing and all(k.startswith("heads.") or k.endswith((".mean", ".std"))
                         for k in missing)
  x = torch.rand(2, 3, 32, 32)
  with torch.no_grad():
    h = x
    for segment in model.segments:
      h = segment(h)
    torch.testing.assert_close(h, features(vgg.InputNorm()(x)))

  other = vgg.build_model("vgg11", 3, width_div=8)
  with pytest.raises(ValueError, match="width_div"):
    vgg.load_weights(other, path)


def test_own_weights_round_trip(tmp_path):
  model = vgg.build_model("vgg11", 5, width_div=16)
  path = tmp_path / "w.pt"
  torch.save(model.state_dict(), path)
  copy = vgg.build_model("vgg11", 5, width_div=16)
  assert vgg.load_weights(copy, path) == []
  x = torch.rand(2, 1, 32, 32)
  with torch.no_grad():
    for a, b in zip(model.eval()(x), copy.eval()(x)):
      torch.testing.assert_close(a, b)


def test_augment_is_seeded_and_in_range():
  images = vgg_traces.load_digits_images().images[:8]
  a = vgg_traces.augment(images, torch.Generator().manual_seed(0))
  b = vgg_traces.augment(images, torch.Generator().manual_seed(0))
  assert torch.equal(a, b) and not torch.equal(a, images)
  assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1


def test_latency_is_positive_per_segment():
  model = vgg.build_model("vgg11", 3, width_div=16)
  ms = vgg.segment_latency(model, device="cpu", warmup=2, repeats=5)
  assert ms.shape == (3,) and np.all(ms > 0)


@pytest.mark.parametrize("signal", ee_vgg.SIGNALS)
def test_a_recorded_signal_leaves_conf_and_pred_alone(tmp_path, signal):
  cfg = dataclasses.replace(TINY, epochs=1, ramp_epochs=0)
  plain = ee_vgg.make_traces(cfg, device="cpu").traces
  run = ee_vgg.make_traces(dataclasses.replace(cfg, signal=signal), device="cpu")
  jexit.save_traces(tmp_path / "s.npz", run.traces)
  traces = jexit.load_traces(tmp_path / "s.npz")
  assert plain.signal is None
  np.testing.assert_array_equal(traces.conf, plain.conf)
  np.testing.assert_array_equal(traces.pred, plain.pred)
  assert traces.signal.shape == traces.conf.shape
  assert traces.signal.min() >= 0 and traces.signal.max() <= 1
  if signal == "margin":  # 1 - (p1 - p2) >= 1 - p1
    assert np.all(traces.signal >= 1 - traces.conf - 1e-6)
  assert jexit.fit(traces, num_bins=4)[1].signal == "signal"  # fit's default reads it


def test_gate_inputs_by_hand():
  logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 1e-20]], dtype=torch.float64))
  got = ee_vgg.ExitGate.inputs(logits).numpy()
  np.testing.assert_allclose(got[0], [np.log(0.3), np.log(0.7 / 0.2), np.log(0.7),
                                      np.log(0.2), np.log(0.1)], rtol=1e-6)
  np.testing.assert_allclose(got[1, :2], [np.log(0.5), 0.0], atol=1e-6)
  assert got[1, 4] == pytest.approx(-30.0)  # log-probabilities are clamped at -30


# Trained enough that the ramps agree with the final head on some rows only.
GATED = dataclasses.replace(TINY, epochs=3, ramp_epochs=3, max_images=300, signal="gate")


@pytest.fixture(scope="module")
def gated_run():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield ee_vgg.make_traces(GATED, device="cpu")
  torch.set_num_threads(threads)


def test_gates_learn_agreement(gated_run):
  # On held-out trace rows the gate ranks "ramp 1 agrees with the final head"
  # better than chance (AUC > 0.6).
  from sklearn.metrics import roc_auc_score
  traces = gated_run.traces
  assert len(ee_vgg.gates_of(gated_run)) == traces.num_ramps - 1
  agree = traces.pred[:, 0] == traces.pred[:, -1]
  assert 0.1 < agree.mean() < 0.9
  assert traces.signal.min() >= 0 and traces.signal.max() <= 1
  assert roc_auc_score(agree, -traces.signal[:, 0]) > 0.6
  np.testing.assert_allclose(traces.signal[:, -1], 1.0 - traces.conf[:, -1], atol=1e-6)


def test_gate_signal_runs_in_the_torch_runner(tmp_path, gated_run):
  # The recorded gate signal is what the gates compute on the trace rows, and a
  # table fitted on it is served by EarlyExitRunner with the gates as signal_fn.
  from jexit import export
  from jexit.runtime import ExitTable
  from jexit.runtime_torch import EarlyExitRunner, max_softmax
  run, traces = gated_run, gated_run.traces
  data = vgg_traces.load_digits_images(GATED.size)
  keep = np.sort(np.random.default_rng(GATED.seed).permutation(len(data.images))[:300])
  data = data._replace(images=data.images[keep], labels=data.labels[keep])
  x, _, _ = vgg_traces.trace_inputs(data, np.unique(run.trace_source), GATED.copies, GATED.seed)
  signal_fns = [g.signal for g in ee_vgg.gates_of(run)] + [lambda z: 1.0 - max_softmax(z)[0]]
  with torch.no_grad():
    logits = run.model(x)
    signal = np.stack([f(z).numpy().astype(np.float64) for f, z in zip(signal_fns, logits)], 1)
  np.testing.assert_allclose(signal, traces.signal, atol=1e-6)
  model, binning = jexit.fit(traces, num_bins=6, signal_range=(0, 1))
  lam = model.loss.max() / traces.cost.sum()  # some inputs stop at ramp 1, most go on
  export.export_policy(tmp_path / "g.npz", jexit.solve(model, np.array([lam])),
                       binning, model, 0)
  table = ExitTable.load(tmp_path / "g.npz", out_of_range="clip")
  want = table.run(None, traces.pred, signal=signal)  # the runner's own float64 signals
  assert len(np.unique(want[0])) >= 2  # inputs exit at several ramps
  out = EarlyExitRunner(run.model.segments, run.model.heads, table, signal_fn=signal_fns)(x)
  np.testing.assert_array_equal(out.stop_ramp.numpy(), want[0])
  np.testing.assert_array_equal(out.output_ramp.numpy(), want[1])


def test_features_and_logits_are_what_the_heads_read(gated_run):
  from experiments import gate_variants
  x = torch.rand(20, 1, 32, 32, generator=torch.Generator().manual_seed(0))
  maps, logits = gate_variants.features_and_logits(gated_run.model, x, batch_size=8)
  with torch.no_grad():
    want = gated_run.model(x)
    for k, head in enumerate(gated_run.model.heads):
      np.testing.assert_allclose(head(maps[k]).numpy(), want[k].numpy(), atol=1e-5)
      np.testing.assert_allclose(logits[k].numpy(), want[k].numpy(), atol=1e-5)


def test_feature_gate_learns_from_the_feature_map():
  # The target depends on the feature map only; the logits are noise.
  from sklearn.metrics import roc_auc_score
  from experiments import gate_variants
  gen = torch.Generator().manual_seed(0)
  maps, logits = torch.randn(1024, 4, 3, 3, generator=gen), torch.randn(1024, 5, generator=gen)
  target = (maps[:, 1].mean((1, 2)) > 0).float()
  torch.manual_seed(0)
  gate = ee_vgg.standardize(gate_variants.FeatureGate(4, 3, 5), logits[:768])
  gate = ee_vgg.fit_gate(gate, (maps[:768], logits[:768]), target[:768], gen, epochs=40)
  signal = gate_variants.signal_of(gate, maps[768:], logits[768:])
  assert roc_auc_score(target[768:].numpy() > 0, -signal) > 0.9


def test_bad_configurations_raise():
  with pytest.raises(ValueError, match="ramp_stages"):
    vgg.EarlyExitVGG("vgg11", (2, 3))
  with pytest.raises(ValueError, match="arch"):
    vgg.EarlyExitVGG("vgg19")
  with pytest.raises(ValueError, match="head_pool: expected an int >= 1, got 0"):
    vgg.EarlyExitVGG("vgg11", head_pool=0)
  with pytest.raises(ValueError, match="training"):
    vgg_traces.train(vgg.build_model(width_div=16), torch.rand(4, 1, 32, 32),
              torch.zeros(4, dtype=torch.int64), training="both", device="cpu")
  with pytest.raises(ValueError, match="signal"):
    ee_vgg.make_traces(dataclasses.replace(TINY, signal="variance"), device="cpu")
  with pytest.raises(ValueError, match=r"signal: expected one of \['entropy', 'margin'\]"):
    vgg_traces.make_traces(dataclasses.replace(TINY, signal="gate"), device="cpu")


def test_cli_writes_a_trace(tmp_path, capsys):
  out = tmp_path / "cli.npz"
  cli.main(["--out", str(out), "--arch", "vgg11", "--ramps", "5", "--epochs", "0",
            "--ramp-epochs", "0", "--width-div", "16", "--copies", "1", "--quiet"])
  traces = jexit.load_traces(out)
  assert traces.num_ramps == 5 and traces.num_inputs == round(0.4 * 1797)
  assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("head_pool", [None, 2])
def test_cli_head_pool_sets_the_ramp_heads(tmp_path, head_pool):
  # VGG-11/16, 5 ramps: conv 3->4 on 32x32 (3x3) + head pool 4x4 (the default)
  # -> linear 64->10, or 2x2 (--head-pool 2, experiments/traces/pool2) -> linear 16->10.
  out = tmp_path / "pool.npz"
  cli.main(["--out", str(out), "--arch", "vgg11", "--ramps", "5", "--epochs", "0",
            "--ramp-epochs", "0", "--width-div", "16", "--copies", "1", "--quiet"]
           + ([] if head_pool is None else ["--head-pool", str(head_pool)]))
  pooled = 4 * (head_pool or 4) ** 2
  assert jexit.load_traces(out).cost[0] == 2 * 3 * 4 * 9 * 32 * 32 + 2 * pooled * 10


def test_weights_of_another_head_pool_are_refused_by_name(tmp_path):
  path = tmp_path / "pool2.pt"
  torch.save(vgg.build_model("vgg11", 3, width_div=16, head_pool=2).state_dict(), path)
  with pytest.raises(ValueError, match=r"heads\.0\.2\.weight has shape \(10, 32\), the model "
                                       r"\(10, 128\) \(saved with another --head-pool"):
    vgg.load_weights(vgg.build_model("vgg11", 3, width_div=16), path)
  with pytest.raises(ValueError, match="a different --ramps, --arch or batch norm"):
    vgg.load_weights(vgg.build_model("vgg11", 5, width_div=16, head_pool=2), path)
  assert vgg.load_weights(vgg.build_model("vgg11", 3, width_div=16, head_pool=2),
                          path) == []


def test_image_folder_makes_a_trace(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  for cls in ("cat", "dog", "eel"):
    (tmp_path / cls).mkdir()
    for i in range(8):
      pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
  data = vgg_traces.load_image_folder(tmp_path, size=32)
  assert tuple(data.images.shape) == (24, 3, 32, 32) and data.num_classes == 3
  assert float(data.images.min()) >= 0 and float(data.images.max()) <= 1
  assert sorted(np.bincount(data.labels.numpy()).tolist()) == [8, 8, 8]
  config = dataclasses.replace(TINY, max_images=None, copies=1)
  run = vgg_traces.make_traces(config, data=data)
  assert run.traces.conf.shape[1] == 3 and run.traces.pred.max() < 3
  jexit.check_traces(run.traces)
  with pytest.raises(ValueError, match="no images"):
    (tmp_path / "empty").mkdir()
    vgg_traces.load_image_folder(tmp_path / "empty")


def _torchvision_file(path, cfg_name, batch_norm, width_div=16):
  """A torchvision-style `features.*` state dict (narrow, random) at `path`."""
  cfg = [v if v == "M" else v // width_div for v in vgg.tv_vgg.cfgs[cfg_name]]
  features = vgg.tv_vgg.make_layers(cfg, batch_norm=batch_norm)
  torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
  return path


def test_weights_of_another_architecture_or_batch_norm_are_refused_by_name(tmp_path):
  vgg16 = _torchvision_file(tmp_path / "vgg16_bn.pt", "D", True)
  with pytest.raises(ValueError, match=r"torchvision vgg16 weights \(13 conv layers\), the "
                                       r"model is vgg11 \(--arch vgg16\?\)"):
    vgg.load_weights(vgg.build_model("vgg11", 3, width_div=16), vgg16)
  vgg19 = _torchvision_file(tmp_path / "vgg19.pt", "E", False)
  with pytest.raises(ValueError, match=r"torchvision vgg19 weights \(16 conv layers\)"):
    vgg.load_weights(vgg.build_model("vgg16", 3, width_div=16), vgg19)
  plain = _torchvision_file(tmp_path / "vgg11.pt", "A", False)
  with pytest.raises(ValueError, match=r"torchvision vgg11 weights \(no batch norm\), the model "
                                       r"has batch norm .*--no-batch-norm"):
    vgg.load_weights(vgg.build_model("vgg11", 3, width_div=16), plain)
  model = vgg.build_model("vgg11", 3, width_div=16, batch_norm=False)
  assert all(k.startswith("heads.") or k.endswith((".mean", ".std"))
             for k in vgg.load_weights(model, plain))
  with pytest.raises(ValueError, match="no such file"):
    vgg.load_weights(model, tmp_path / "missing.pt")
  (tmp_path / "junk.pt").write_bytes(b"not a torch file")
  with pytest.raises(ValueError, match="could not read it as a torch state dict"):
    vgg.load_weights(model, tmp_path / "junk.pt")
  torch.save([1, 2], tmp_path / "list.pt")
  with pytest.raises(ValueError, match="expected a state dict"):
    vgg.load_weights(model, tmp_path / "list.pt")


def test_torchvision_backbone_heads_train_on_the_frozen_backbone(tmp_path):
  # A torchvision file sets the backbone only: with no backbone epochs, the ramp
  # phase trains every head, the final one too, and the backbone stays as loaded.
  path = _torchvision_file(tmp_path / "vgg11_bn.pt", "A", True)
  config = dataclasses.replace(TINY, epochs=0, ramp_epochs=1, max_images=80, copies=1)
  run = vgg_traces.make_traces(config, weights=path, device="cpu")
  loaded = vgg.build_model("vgg11", 3, width_div=16)
  vgg.load_weights(loaded, path)
  for key, value in run.model.state_dict().items():
    if key.startswith("segments."):
      assert torch.equal(value, loaded.state_dict()[key]), key
  torch.manual_seed(TINY.seed)  # make_traces' own initialisation of the heads
  init = vgg.build_model("vgg11", 3, width_div=16).state_dict()
  assert not torch.equal(run.model.state_dict()["heads.2.2.weight"], init["heads.2.2.weight"])
  with pytest.raises(ValueError, match=r"ramp_epochs: weights .* set no ramp heads .*"
                                       r"--train-ramps"):
    vgg_traces.make_traces(dataclasses.replace(config, ramp_epochs=0), weights=path, device="cpu")


def test_image_folder_sizes_are_checked(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  for cls, shape in (("a", (40, 48, 3)), ("b", (36, 36, 3))):
    (tmp_path / cls).mkdir()
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(
        tmp_path / cls / "0.png")
  with pytest.raises(ValueError, match=r"expected images of one size, got 40x48 .* and 36x36 "
                                       r".*pass a size"):
    vgg_traces.load_image_folder(tmp_path, size=None)
  assert tuple(vgg_traces.load_image_folder(tmp_path, size=32).images.shape) == (2, 3, 32, 32)
  small = tmp_path / "small"
  (small / "a").mkdir(parents=True)
  Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(small / "a" / "0.png")
  with pytest.raises(ValueError, match=r"at least 32x32 pixels .* got 16x16"):
    vgg_traces.load_image_folder(small, size=None)
  with pytest.raises(ValueError, match="size: expected an int >= 32"):
    vgg_traces.load_image_folder(small, size=16)
  with pytest.raises(ValueError, match="no such folder"):
    vgg_traces.load_image_folder(tmp_path / "nowhere")
  with pytest.raises(ValueError, match=r"images: expected \[B, 1 or 3, H, W\] with H, W >= 32"):
    vgg.build_model(width_div=16).eval()(torch.rand(2, 3, 16, 16))


SUITE = [f"digits_{a}_{r}ramps" for a in ("vgg11", "vgg13", "vgg16") for r in (3, 5)]


def _suite_pair(name, folder, base="traces/pool2"):
  """The traces `name` in `experiments/<base>` and in `experiments/<folder>`."""
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
  return tuple(jexit.load_traces(os.path.join(here, f, name + ".npz")) for f in (base, folder))


@pytest.mark.parametrize("name", SUITE)
def test_joint_suite_has_the_same_costs_and_earlier_agreement(name):
  # experiments/reports/JOINT.md: same networks and rows, ramps trained with the backbone.
  separate, joint = _suite_pair(name, "traces/joint")
  np.testing.assert_array_equal(joint.cost, separate.cost)
  np.testing.assert_array_equal(joint.label, separate.label)
  agree = lambda t: (t.pred[:, :-1] == t.pred[:, -1:]).mean(0)
  assert agree(joint)[0] > agree(separate)[0]


@pytest.mark.parametrize("base,folder", [("traces/pool2", "traces/pool4"),
                                         ("traces/s1", "traces/pool4_s1")])
@pytest.mark.parametrize("name", SUITE)
def test_pool4_suite_has_bigger_heads_only_and_earlier_agreement(name, base, folder):
  # experiments/reports/POOL4.md and CONFIRM.md: the same command with --head-pool 4 as
  # with 2; the heads' linear layers read 16 pooled positions instead of 4 (10 classes).
  pool2, pool4 = _suite_pair(name, folder, base)
  np.testing.assert_array_equal(pool4.label, pool2.label)
  extra = pool4.cost - pool2.cost
  assert extra[-1] == 0 and np.all(extra[:-1] > 0)
  assert np.all(extra[:-1] % (2 * 12 * 10) == 0)  # 2 FLOPs x channels x 12 more inputs x 10
  assert np.all(extra < 0.005 * pool2.cost)
  agree = lambda t: (t.pred[:, :-1] == t.pred[:, -1:]).mean(0)
  assert agree(pool4)[0] > agree(pool2)[0] + 0.05


@pytest.mark.parametrize("name", SUITE)
def test_seed_1_suites_hold_out_other_images(name):
  # experiments/reports/CONFIRM.md: --seed 1 draws another split of the 1,797 images.
  seed0, seed1 = _suite_pair(name, "traces/s1")
  assert seed0.num_inputs == seed1.num_inputs == 2876
  assert not np.array_equal(seed0.label, seed1.label)
  blocks = seed1.label.reshape(-1, 4)  # rows 4i..4i+3: copies of one held-out image
  assert np.all(blocks == blocks[:, :1])


@pytest.mark.parametrize("name", SUITE)
def test_margin_suite_is_the_suite_plus_a_signal(name):
  # experiments/reports/MARGIN.md: the same command with --signal margin; nothing else changes.
  plain, margin = _suite_pair(name, "traces/margin")
  for field in ("conf", "pred", "label", "cost"):
    np.testing.assert_array_equal(getattr(margin, field), getattr(plain, field))
  assert plain.signal is None
  assert np.all(margin.signal >= 1 - margin.conf - 1e-6) and margin.signal.max() <= 1


@pytest.mark.parametrize("name", SUITE)
def test_gate_suite_is_the_suite_plus_a_signal(name):
  # experiments/reports/GATE.md: the same command with --signal gate; nothing else changes.
  plain, gate = _suite_pair(name, "traces/gate")
  for field in ("conf", "pred", "label", "cost"):
    np.testing.assert_array_equal(getattr(gate, field), getattr(plain, field))
  np.testing.assert_allclose(gate.signal[:, -1], 1.0 - gate.conf[:, -1], atol=1e-6)
  assert gate.signal.min() >= 0 and gate.signal.max() <= 1
