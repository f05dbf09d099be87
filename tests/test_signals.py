"""The signal registry: array, per-ramp and one-input paths agree bit for bit."""

import numpy as np
import pytest

from jexit import signals


def _outputs(seed=0, n=300, k=4, classes=5):
  rng = np.random.default_rng(seed)
  conf = rng.uniform(size=(n, k))
  conf[:5] = 1.0  # log(1 - conf) floor
  pred = rng.integers(0, classes, (n, k))
  pred[:3, 1] = classes + 2  # a class the weights never saw
  calibration = rng.normal(size=(k - 1, 2 * classes + 3))
  return conf, pred, calibration


def test_values_are_the_documented_formulas():
  conf, pred, cal = _outputs()
  np.testing.assert_array_equal(signals.values("1-conf", conf, pred), 1 - conf)
  changed = np.zeros(conf.shape)
  changed[:, 1:] = pred[:, 1:] != pred[:, :-1]
  np.testing.assert_array_equal(signals.values("stability", conf, pred), (1 - conf) + changed)
  got = signals.values("class", conf, pred, calibration=cal)
  c = (cal.shape[1] - 3) // 2
  for k in range(conf.shape[1] - 1):
    feats = signals.class_features(conf[:, k], pred[:, k], None if k == 0 else pred[:, k - 1], c)
    np.testing.assert_allclose(got[:, k], 1 / (1 + np.exp(feats @ cal[k])), rtol=1e-12)
  np.testing.assert_array_equal(got[:, -1], 1 - conf[:, -1])
  own = np.random.default_rng(1).normal(size=conf.shape)
  np.testing.assert_array_equal(signals.values("signal", conf, pred, signal=own), own)


@pytest.mark.parametrize("name", ["1-conf", "stability", "class"])
def test_ramp_and_one_input_paths_equal_the_array_path(name):
  conf, pred, cal = _outputs(3)
  whole = signals.values(name, conf, pred, calibration=cal)
  entry = signals.get(name)
  weights = cal.tolist()
  for k in range(conf.shape[1]):
    prev = None if k == 0 else pred[:, k - 1]
    np.testing.assert_array_equal(
        signals.ramp_values(name, k, conf[:, k], pred[:, k], prev, cal), whole[:, k])
    one = [entry.one(k, float(conf[i, k]), int(pred[i, k]),
                     None if k == 0 else int(pred[i, k - 1]), weights)
           for i in range(len(conf))]
    np.testing.assert_array_equal(one, whole[:, k])


def test_ranges_hold_and_errors_name_the_field():
  conf, pred, cal = _outputs(5)
  for name, entry in signals.REGISTRY.items():
    if entry.range is not None:
      v = signals.values(name, conf, pred, calibration=cal)
      assert entry.range[0] <= v.min() and v.max() <= entry.range[1], name
  with pytest.raises(ValueError, match=r"binning.signal: expected one of \['1-conf'"):
    signals.values("entropy", conf, pred, field="binning.signal")
  with pytest.raises(ValueError, match="'class' needs finite weights"):
    signals.values("class", conf, pred, calibration=cal[:1])
  with pytest.raises(ValueError, match="traces have none"):
    signals.values("signal", conf, pred)


def test_recorded_signals_from_a_softmax():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(50, 7)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.sort(probs, -1)
  np.testing.assert_allclose(signals.margin(probs), 1 - (top[:, -1] - top[:, -2]))
  ent = -(probs * np.log(probs)).sum(-1) / np.log(7)
  np.testing.assert_allclose(signals.entropy(probs), ent)
  assert np.allclose(signals.entropy(np.eye(7)), 0) and np.allclose(
      signals.entropy(np.full((1, 7), 1 / 7)), 1)
