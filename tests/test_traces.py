"""The trace container and file: optional head costs and ramp positions."""

import numpy as np
import pytest

import jexit
from jexit.export import trace_sha256


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
