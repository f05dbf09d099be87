"""The trace container and its file format (never unpickled)."""

import struct
import zipfile

import numpy as np
import pytest

import jexit
from jexit.export import trace_sha256
from test_fit import _good


def _traces(**extra):
  rng = np.random.default_rng(0)
  return jexit.Traces(conf=rng.uniform(size=(20, 3)), pred=rng.integers(0, 4, (20, 3)),
                      label=rng.integers(0, 4, 20), cost=np.array([3.0, 2.0, 5.0]), **extra)


def test_head_cost_and_position_round_trip_and_hash(tmp_path):
  t = jexit.check_traces(_traces(head_cost=[1.0, 2.0, 0.5], position=[0, 0, 1]))
  assert t.head_cost.dtype == np.float64 and t.position.dtype == np.int64
  jexit.save_traces(tmp_path / "t.npz", t)
  back = jexit.load_traces(tmp_path / "t.npz")
  np.testing.assert_array_equal(back.head_cost, t.head_cost)
  np.testing.assert_array_equal(back.position, t.position)
  assert trace_sha256(back) == trace_sha256(t)
  # The new fields change the hash; traces without them hash as before.
  plain = _traces()
  assert trace_sha256(t) != trace_sha256(plain)
  assert trace_sha256(plain) == trace_sha256(jexit.check_traces(plain))
  sub = t.take([1, 2])
  np.testing.assert_array_equal(sub.head_cost, t.head_cost)
  np.testing.assert_array_equal(sub.position, t.position)


@pytest.mark.parametrize("extra, match", [
    (dict(head_cost=[1.0, 2.0]), r"traces.head_cost: expected shape \[K\] = \(3,\)"),
    (dict(head_cost=[1.0, 2.5, 0.5]), r"traces.head_cost: expected finite values in \[0, cost"),
    (dict(head_cost=[-1.0, 1.0, 0.5]), "traces.head_cost: expected finite values"),
    (dict(head_cost=[np.nan, 1.0, 0.5]), "traces.head_cost: expected finite values"),
    (dict(head_cost=["a", "b", "c"]), "traces.head_cost: expected real numbers"),
    (dict(head_cost=[1.0, 1.0, 1.0], position=[0, 1, 0]),
     "traces.position: expected nondecreasing"),
    (dict(head_cost=[1.0, 1.0, 1.0], position=[0.0, 1.0, 2.0]),
     "traces.position: expected integer positions"),
    (dict(position=[0, 1, 2]), "traces.position: expected head_cost as well"),
    # Ramp 1 shares ramp 0's position, so its cost must be its head alone.
    (dict(head_cost=[1.0, 1.0, 1.0], position=[0, 0, 1]),
     r"traces.position: expected cost\[k\] == head_cost\[k\]"),
])
def test_bad_head_cost_or_position_names_the_field(extra, match):
  with pytest.raises(ValueError, match=match):
    jexit.check_traces(_traces(**extra))


def test_trace_file_round_trip(tmp_path):
  traces = jexit.Traces(**_good(), signal=np.random.default_rng(8).uniform(size=(10, 3)))
  path = tmp_path / "t.npz"
  jexit.save_traces(path, traces)
  back = jexit.load_traces(path)
  np.testing.assert_allclose(back.conf, traces.conf, rtol=1e-6)
  np.testing.assert_array_equal(back.pred, traces.pred)
  np.testing.assert_array_equal(back.label, traces.label)
  np.testing.assert_allclose(back.signal, traces.signal, rtol=1e-6)


def test_trace_file_errors(tmp_path):
  good = _good()
  unknown = tmp_path / "unknown.npz"
  np.savez(unknown, **good, extra=np.ones(3))
  with pytest.raises(ValueError, match="unknown key.*extra"):
    jexit.load_traces(unknown)
  missing = tmp_path / "missing.npz"
  np.savez(missing, conf=good["conf"], cost=good["cost"])
  with pytest.raises(ValueError, match="missing key.*pred"):
    jexit.load_traces(missing)
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(b"PK\x03\x04 this is not a zip file")
  with pytest.raises(ValueError, match="could not read"):
    jexit.load_traces(corrupt)
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, conf=good["conf"], pred=np.array([object()] * 3), cost=good["cost"])
  with pytest.raises(ValueError, match="pred"):
    jexit.load_traces(pickled)
  bad_value = tmp_path / "nan.npz"
  np.savez(bad_value, **{**good, "conf": np.full((10, 3), np.nan)})
  with pytest.raises(ValueError, match="traces.conf"):
    jexit.load_traces(bad_value)
  with pytest.raises(ValueError, match="could not read"):
    jexit.load_traces(tmp_path / "does_not_exist.npz")


def test_trace_file_with_corrupt_compressed_data(tmp_path):
  path = tmp_path / "t.npz"
  np.savez_compressed(path, **_good())
  data = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as z:
    at = z.getinfo("conf.npy").header_offset
  name_len, extra_len = struct.unpack("<HH", data[at + 26:at + 30])
  start = at + 30 + name_len + extra_len
  data[start:start + 20] = bytes(20)  # conf.npy's deflate stream: a zlib error
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="trace file .*corrupt"):
    jexit.load_traces(path)


def test_trace_file_that_is_not_a_zip(tmp_path):
  text = tmp_path / "text.npz"
  text.write_text("conf,pred\n0.5,1\n")
  with pytest.raises(ValueError, match="not a zip archive"):
    jexit.load_traces(text)
  single = tmp_path / "single.npy"
  np.save(single, np.ones((3, 3)))
  with pytest.raises(ValueError, match="single .npy array"):
    jexit.load_traces(single)
