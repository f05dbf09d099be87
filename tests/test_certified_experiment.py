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


def test_raw_outcomes_round_trip_through_json(load_script, tmp_path):
  """The saved outcomes (gzipped JSON, never pickle) read back into the same structures."""
  cert = load_script("experiments/certified.py")
  rows = {(0.01, 0.1): {"certified jexit": [(0.004, 1.7), (0.012, 2.1)]},
          (0.01, 0.1, "family"): "recall[class]", (0.005, 0.05, "family"): None,
          "units": 360, "cal_rows": 1440, "fit_rows": 1436}
  cells = {"digits-x": [rows]}
  examples = {("digits-x", 0.01, 0.1): {"eps": 0.01, "index": 3}, ("digits-x", 0.005, 0.1): None}
  shares = {0.7: {"digits-x": [{0.01: {"certified jexit": [(0.1 + 0.2, 1.0 / 3)]},
                                "units": 504}]}}
  timing = {"digits-x": 12.5}
  args = cert.argparse.Namespace(seeds=1, draws=2, cal_share=0.5)
  path = tmp_path / "r.json.gz"
  cert.save_results(path, cells, examples, timing, shares, elapsed=3.0, command="c",
                    started="s", args=args)
  got = cert.load_results(path)
  assert got[:4] == (cells, examples, timing, shares)  # floats exact, tuple keys back
  assert got[4:7] == (3.0, "c", "s") and vars(got[7]) == vars(args)
  source = open(cert.__file__, encoding="utf-8").read()
  assert "import pickle" not in source and "pickle." not in source
