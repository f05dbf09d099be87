"""The plain-array choosers of experiments/certified.py."""

import numpy as np


def test_uncertified_index_and_family_choice(load_script):
  cert = load_script("experiments/certified.py")
  loss = np.array([0.0, 0.004, 0.009, 0.012])
  speed = np.array([1.0, 1.5, 2.0, 2.5])
  assert cert.uncertified_index(loss, speed, 0.01) == 2
  assert cert.uncertified_index(loss, speed, 0.0) == 0
  assert cert.uncertified_index(loss + 0.5, speed, 0.01) is None
  paths = {"a": cert.Path(loss, speed, None),
           "b": cert.Path(np.array([0.0, 0.002]), np.array([1.2, 1.8]), None)}
  # At 1% family a reaches 2.0x; within 0.3% only b's 1.8x beats a's 1.0x.
  assert cert.family_by_fit(paths, ("a", "b"), 0.01) == "a"
  assert cert.family_by_fit(paths, ("a", "b"), 0.003) == "b"
  # Nothing faster than the backbone: no family.
  slow = {"a": cert.Path(np.array([0.0]), np.array([1.0]), None)}
  assert cert.family_by_fit(slow, ("a",), 0.01) is None
