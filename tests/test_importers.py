"""Tests of the Apparate importer: refuses without the flag, admits only plain data."""

import os
import pickle

import numpy as np
import pytest

from jexit.importers import apparate_to_traces, load_apparate, restricted_loads


def write(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=protocol)
  return path


PROFILE = {"conf": [[0.9, 0.3, 0.6], np.array([0.95, 0.5, 0.7]), [None, None, None]],
           "acc": [[True, False, True], np.array([True, True, False]), [True, True, True]]}


def test_refuses_without_the_flag(tmp_path):
  path = write(tmp_path / "p.pickle", PROFILE)
  with pytest.raises(ValueError, match="allow_pickle=True"):
    load_apparate(path)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
  def __reduce__(self):
    return (eval, ("__import__('os').getcwd()",))


def test_rejects_malicious_pickles_even_with_the_flag(tmp_path):
  marker = tmp_path / "pwned"
  path = write(tmp_path / "evil.pickle", {"conf": [[0.5]], "acc": [_Evil(marker)]})
  with pytest.raises(ValueError, match="refusing to load global '(posix|os|nt).system'"):
    load_apparate(path, allow_pickle=True)
  assert not marker.exists()
  for protocol in (0, 2):
    path = write(tmp_path / f"eval{protocol}.pickle", _EvalEvil(), protocol=protocol)
    with pytest.raises(ValueError, match="(builtins|__builtin__).eval"):
      load_apparate(path, allow_pickle=True)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_loads_lists_and_numpy_arrays(tmp_path, protocol):
  path = write(tmp_path / "p.pickle", PROFILE, protocol=protocol)
  traces = load_apparate(path, allow_pickle=True, cost=[1.0, 2.0, 4.0])
  np.testing.assert_allclose(traces.conf, [[0.9, 0.95, 1], [0.3, 0.5, 1], [0.6, 0.7, 1]])
  np.testing.assert_array_equal(traces.pred, [[0, 0, 0], [1, 0, 0], [0, 1, 0]])
  assert traces.label is None
  np.testing.assert_allclose(traces.cost, [1, 2, 4])
  np.testing.assert_array_equal(load_apparate(path, allow_pickle=True).cost, [1, 1, 1])


def test_malformed_profiles_and_files(tmp_path):
  with pytest.raises(ValueError, match="keys 'conf' and 'acc'"):
    apparate_to_traces({"conf": [[0.5]]})
  with pytest.raises(ValueError, match=r"apparate\['acc'\]\[1\]: expected 2 inputs"):
    apparate_to_traces({"conf": [[0.5, 0.5], [1, 1]], "acc": [[True, True], [True]]})
  with pytest.raises(ValueError, match="traces.conf"):
    apparate_to_traces({"conf": [[1.5], [1.0]], "acc": [[True], [True]]})
  with pytest.raises(ValueError, match=r"apparate\['conf'/'acc'\]\[0\].*'no'"):
    apparate_to_traces({"conf": [[0.5], [1.0]], "acc": [["no"], [True]]})  # bool("no") is True
  with pytest.raises(ValueError, match="cost: expected"):
    apparate_to_traces({"conf": [[0.5], [1.0]], "acc": [[True], [True]]}, cost=["a", "b"])
  with pytest.raises(ValueError, match="traces.cost"):
    apparate_to_traces(PROFILE, cost=[1.0, 2.0])
  bad = tmp_path / "bad.pickle"
  bad.write_bytes(b"\x80\x05not a pickle at all")
  with pytest.raises(ValueError, match="not a readable pickle"):
    load_apparate(bad, allow_pickle=True)
  with pytest.raises(ValueError, match="could not read"):
    load_apparate(tmp_path / "missing.pickle", allow_pickle=True)
  plain = [1, 2.5, "x", (True, None), {3}, b"y"]
  for protocol in range(6):
    assert restricted_loads(pickle.dumps(plain, protocol=protocol)) == plain
