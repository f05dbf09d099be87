"""Hostile and extreme inputs (issue 25): every public entry point and CLI
subcommand answers a bad input with a ValueError naming the field (API) or one
`jexit: error:` line and exit code 2 naming the flag (CLI), and no input makes
jexit allocate more than the host has.

Inputs are generated (hypothesis, derandomized so CI is reproducible) from
extreme values: NaN, +-inf, 1e308, float32 overflow and underflow, negative
counts, huge sizes, wrong types, mutated files. Memory guards are checked
two ways: with `jexit.checks.available_bytes` patched small (the guard must
fire before the allocation), and in a subprocess under `RLIMIT_AS`.
"""

import io
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jexit
from jexit import baselines, checks, cli
from jexit.importers import load_apparate, restricted_loads
from jexit.npzio import read_npz
from jexit.runtime import ExitTable

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
FEW = settings(FUZZ, max_examples=15)

INF, NAN = float("inf"), float("nan")
EXTREME = [0.0, -0.0, 0.5, 1.0, -1.0, 2.0, 1e-46, 1e-39, 1e-30, 1e30, 1e39, 1e308, -1e308,
           INF, -INF, NAN]
WRONG_TYPES = ["0.01", None, [1.0], {"a": 1}, b"x", True, 1j]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def traces(n=60, k=3, seed=0, **kw):
  rng = np.random.default_rng(seed)
  conf = rng.uniform(size=(n, k))
  pred = rng.integers(0, 3, (n, k))
  fields = dict(conf=conf, pred=pred, label=pred[:, -1].copy(), cost=np.arange(1.0, k + 1))
  fields.update(kw)
  return jexit.Traces(**fields)


@pytest.fixture
def small_memory(monkeypatch):
  """The host seems to have 256 MiB: every user-sized allocation above 128 MiB
  must be refused before it is made."""
  monkeypatch.setattr(checks, "available_bytes", lambda: 256 << 20)


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("hostile") / "t.npz"
  jexit.save_traces(path, traces(n=120))
  return str(path)


@pytest.fixture(scope="module")
def signal_trace_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("hostile") / "s.npz"
  jexit.save_traces(path, traces(n=120, signal=np.random.default_rng(1).uniform(size=(120, 3))))
  return str(path)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
  t = traces(n=120)
  model, binning = jexit.fit(t, num_bins=4)
  policy = jexit.solve(model, np.array([0.05]))
  path = tmp_path_factory.mktemp("hostile") / "p.npz"
  jexit.export_policy(path, policy, binning, model, 0)
  return ExitTable.load(path)


def assert_names(e, *fields):
  assert any(str(e.value).startswith(f) or f"{f}:" in str(e.value) or f"{f}=" in str(e.value)
             for f in fields), (fields, str(e.value))


# --- 1. memory guards -------------------------------------------------------------------

def test_num_bins_refused_before_the_transitions_are_allocated():
  t = traces(n=40, k=64)
  with pytest.raises(ValueError, match=r"num_bins=10000: 3 x \[63, 10000, 10000\] float64 "
                                       r"transitions need .* GiB, more than half the available"):
    jexit.fit(t, num_bins=10000)
  with pytest.raises(ValueError, match=r"step=0.0002: .* transitions .* use a larger step"):
    jexit.fit(t, bins="uniform", step=2e-4)


@FUZZ
@given(num_bins=st.one_of(st.integers(-3, 400), st.sampled_from([10 ** 4, 10 ** 9])),
       step=st.sampled_from(EXTREME + [1e-3, 0.08]), bins=st.sampled_from(["quantile",
                                                                           "uniform", "x"]))
def test_fit_options_fail_cleanly_within_memory(small_memory, num_bins, step, bins):
  t = traces(n=40, k=16)
  try:
    model, binning = jexit.fit(t, num_bins=num_bins, step=step, bins=bins)
  except ValueError as e:
    assert str(e).split(":")[0].split("=")[0] in ("num_bins", "step", "bins"), str(e)
    return
  assert model.trans.nbytes * 3 <= 128 << 20
  assert np.allclose(model.trans.sum(-1), 1)


def test_solver_lam_grid_and_one_policy_refused(small_memory):
  model, _ = jexit.fit(traces(), num_bins=4)
  with pytest.raises(ValueError, match="lambdas: 10000000 lam values"):
    jexit.solve(model, np.zeros(10 ** 7))
  s = 2000  # one policy's [X, S] buffers: 4 x 6000 x 2000 float32 = 183 MiB
  big = jexit.ExitModel(init=np.full(s, 1 / s), trans=np.full((2, s, s), 1 / s),
                        loss=np.linspace(0, 1, 3 * s).reshape(3, s), cost=np.ones(3))
  with pytest.raises(ValueError, match=r"model: one policy's working memory \(K=3 ramps, "
                                       r"S=2000 bins"):
    jexit.solve(big, np.array([0.1]))


@pytest.mark.parametrize("call, option", [
    (lambda t: baselines.threshold_rule(t, np.zeros((10 ** 6, 3))), "thresholds"),
    (lambda t: baselines.global_threshold(t, np.zeros(10 ** 6), return_per_input=True),
     "thresholds"),
    (lambda t: baselines.patience(t, np.ones(10 ** 6, int)), "patiences"),
    (lambda t: baselines.oracle(t, np.zeros(10 ** 6)), "lambdas"),
])
def test_baseline_grids_refused(small_memory, call, option):
  with pytest.raises(ValueError, match=rf"^{option}: 1000000 rows x 60 inputs x 3 ramps"):
    call(traces())


def test_memory_bounded_under_rlimit(tmp_path):
  """Hostile sizes in a process whose address space is capped 1.5 GiB above
  what it uses: each is a ValueError, none a MemoryError or a kill."""
  npz = tmp_path / "claim.npz"
  _npz_claiming(npz, (1 << 27,))  # 1 GiB of float64 in a few hundred bytes
  script = textwrap.dedent(f"""
      import pickle, resource, struct, numpy as np, jexit
      from jexit.importers import restricted_loads
      vsize = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
      resource.setrlimit(resource.RLIMIT_AS, (vsize + (3 << 29), resource.RLIM_INFINITY))
      rng = np.random.default_rng(0)
      t = jexit.Traces(rng.uniform(size=(40, 64)), rng.integers(0, 3, (40, 64)), None,
                       np.ones(64))
      calls = [
          lambda: jexit.fit(t, num_bins=2000),  # 15 GiB of transitions
          lambda: jexit.load_traces({str(npz)!r}),
          lambda: restricted_loads(b"\\x80\\x04\\x8e" + struct.pack("<Q", 1 << 31) + b"ab"),
          lambda: restricted_loads(b"\\x80\\x02c__builtin__\\nbytearray\\nJ\\x00\\x00\\x00@\\x85R."),
      ]
      for call in calls:
        try:
          call()
          print("ran")
        except (ValueError, pickle.UnpicklingError) as e:  # the refusals
          print("refused", type(e).__name__, str(e)[:60])
      """)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=env, timeout=120, check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  lines = res.stdout.splitlines()
  assert len(lines) == 4 and all(line.startswith("refused") for line in lines), lines


# --- 2. float32 range, zero first cost, labels of -1 ------------------------------------

@pytest.mark.parametrize("cost", [[1, 1e39, 1], [1e308, 1, 1], [1e-46, 1, 1],
                                  [1, 1e-46, 1], [3e38, 3e38, 1]])
def test_costs_outside_float32_are_refused(cost):
  with pytest.raises(ValueError, match=r"traces.cost: expected .*float32"):
    jexit.check_traces(traces(cost=np.array(cost, float)))
  model, _ = jexit.fit(traces(), num_bins=3)
  with pytest.raises(ValueError, match=r"model.cost: expected .*float32"):
    jexit.solve(model._replace(cost=np.array(cost, float)), np.array([0.1]))


def test_zero_cost_first_ramp_and_negative_labels_are_refused():
  with pytest.raises(ValueError, match=r"traces.cost: expected cost\[0\] > 0"):
    jexit.check_traces(traces(cost=np.array([0.0, 1.0, 1.0])))
  label = np.zeros(60, int)
  label[7] = -1
  with pytest.raises(ValueError, match=r"traces.label: expected class ids >= 0 \(an "
                                       r"unlabelled trace omits the label field.*-1 at row 7"):
    jexit.check_traces(traces(label=label))


@pytest.mark.parametrize("value", [1e308, -1e308, 3.5e38])
def test_signals_beyond_float32_are_refused(value, tmp_path):
  signal = np.random.default_rng(0).uniform(size=(60, 3))
  signal[5, 1] = value
  with pytest.raises(ValueError, match=r"traces.signal: expected values within"):
    jexit.check_traces(traces(signal=signal))


def test_policy_edges_whose_span_overflows_are_refused(table):
  edges = table.edges.copy()
  edges[0, 0], edges[0, -1] = -1e308, 1e308  # span inf: the range check would be off
  with pytest.raises(ValueError, match="edges: expected a finite span"):
    ExitTable(table.header, edges, table.loss, table.threshold, table.cost)


@FUZZ
@given(data=st.data())
def test_generated_traces_are_valid_or_refused(data):
  n, k = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
  value = st.sampled_from(EXTREME)
  conf = np.array(data.draw(st.lists(value, min_size=n * k, max_size=n * k))).reshape(n, k)
  conf = np.where(data.draw(st.booleans()), np.clip(np.nan_to_num(conf), 0, 1), conf)
  pred = np.array(data.draw(st.lists(st.integers(-2, 5), min_size=n * k,
                                     max_size=n * k))).reshape(n, k)
  cost = np.array(data.draw(st.lists(value, min_size=k, max_size=k)))
  label = data.draw(st.one_of(st.none(), st.lists(st.integers(-2, 5), min_size=n,
                                                  max_size=n).map(np.array)))
  signal = data.draw(st.one_of(st.none(), st.lists(value, min_size=n * k, max_size=n * k)
                               .map(lambda v: np.array(v).reshape(n, k))))
  try:
    t = jexit.check_traces(jexit.Traces(conf, pred, label, cost, signal=signal))
  except ValueError as e:
    assert str(e).startswith("traces."), str(e)
    return
  assert np.all((t.conf >= 0) & (t.conf <= 1)) and t.cost[0] > 0
  f32 = np.abs(t.cost[t.cost != 0])
  assert np.all((f32 >= checks.FLOAT32_TINY) & (f32 <= checks.FLOAT32_MAX))
  assert t.label is None or t.label.min() >= 0
  assert t.signal is None or np.all(np.abs(t.signal) <= checks.FLOAT32_MAX)


# --- 3. pickles -------------------------------------------------------------------------

HOSTILE_PICKLES = {
    "ndarray(shape)": b"\x80\x02cnumpy\nndarray\nJ\x80\x96\x98\x00\x85U\x02f8\x86R.",
    "bytearray(n)": b"\x80\x02c__builtin__\nbytearray\nJ\x00\xca\x9a;\x85R.",
    "bytes(n)": b"\x80\x02c__builtin__\nbytes\nJ\x00\xca\x9a;\x85R.",
    "_reconstruct(ndarray, huge)": (b"\x80\x02cnumpy._core.multiarray\n_reconstruct\n"
                                    b"cnumpy\nndarray\nJ\x80\x96\x98\x00\x85C\x01b\x87R."),
    "object dtype": b"\x80\x02cnumpy\ndtype\nX\x01\x00\x00\x00O\x89\x88\x87R.",
    "BINBYTES8 of 4 GiB": b"\x80\x04\x8e" + struct.pack("<Q", 1 << 32) + b"abc",
    "complex": b"\x80\x02c__builtin__\ncomplex\nK\x01\x85R.",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_PICKLES))
def test_restricted_unpickler_refuses_sizes_beyond_the_file(name, tmp_path):
  path = tmp_path / "p.pickle"
  path.write_bytes(HOSTILE_PICKLES[name])
  with pytest.raises(ValueError, match=r"apparate file .*(refusing|claims|expected|not a "
                                       r"readable pickle)"):
    load_apparate(path, allow_pickle=True)


PROFILE = {"conf": [np.array([0.9, 0.3, 0.6]), [0.95, 0.5, 0.7], [None, None, None]],
           "acc": [np.array([True, False, True]), [True, True, False], [True, True, True]]}


@FUZZ
@given(protocol=st.sampled_from([0, 2, 4, 5]), data=st.data())
def test_mutated_pickles_load_or_are_refused(protocol, data, tmp_path_factory):
  raw = bytearray(pickle.dumps(PROFILE, protocol=protocol))
  for _ in range(data.draw(st.integers(1, 4))):
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
  raw = raw[:data.draw(st.integers(1, len(raw)))]
  path = tmp_path_factory.mktemp("pk") / "p.pickle"
  path.write_bytes(bytes(raw))
  try:
    t = load_apparate(path, allow_pickle=True)
  except ValueError as e:
    assert str(e).startswith("apparate") or str(e).startswith("traces."), str(e)
    return
  assert t.conf.shape[0] <= len(raw)  # nothing larger than the file


def test_valid_pickles_still_load():
  for protocol in range(6):
    out = restricted_loads(pickle.dumps(PROFILE, protocol=protocol))
    np.testing.assert_array_equal(out["conf"][0], PROFILE["conf"][0])


# --- 4. npz headers ---------------------------------------------------------------------

def _npz_claiming(path, shape, key="conf"):
  """A .npz whose member's header claims `shape` of float64 but holds 8 bytes."""
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False,
                                             "shape": shape})
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr(f"{key}.npy", buf.getvalue() + b"\0" * 8)
    z.writestr("cost.npy", _npy(np.ones(2)))
    z.writestr("pred.npy", _npy(np.zeros((1, 2), int)))


def _npy(a):
  buf = io.BytesIO()
  np.save(buf, a)
  return buf.getvalue()


def test_npz_members_beyond_the_memory_limit(tmp_path):
  path = tmp_path / "t.npz"
  jexit.save_traces(path, traces(n=200))
  assert read_npz(path, "file", max_bytes=200 * 3 * 8)["conf"].shape == (200, 3)
  with pytest.raises(ValueError, match=r"key '(conf|pred)': its header claims shape \(200, 3\) "
                                       r".*more than the .* GiB allowed"):
    read_npz(path, "file", max_bytes=1000)


@pytest.mark.parametrize("shape, match", [
    ((10 ** 12, 64), "claims shape \\(1000000000000, 64\\).*holds only 8 bytes"),
    ((1 << 24,), "but the member holds only 8 bytes"),  # 128 MiB claimed, 8 bytes held
])
def test_npz_headers_cannot_claim_more_than_the_file_holds(tmp_path, shape, match):
  path = tmp_path / "claim.npz"
  _npz_claiming(path, shape)
  with pytest.raises(ValueError, match=f"trace file .*key 'conf'.*{match}"):
    jexit.load_traces(path)
  with pytest.raises(ValueError, match=f"policy file .*{match}"):
    ExitTable.load(path)


@FUZZ
@given(data=st.data())
def test_mutated_npz_files_load_or_are_refused(data, trace_file, tmp_path_factory):
  raw = bytearray(open(trace_file, "rb").read())
  for _ in range(data.draw(st.integers(1, 6))):
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
  path = tmp_path_factory.mktemp("npz") / "t.npz"
  path.write_bytes(bytes(raw[:data.draw(st.integers(1, len(raw)))]))
  try:
    jexit.load_traces(path)
  except ValueError as e:
    assert str(e).startswith("trace file") or str(e).startswith("traces."), str(e)
  try:
    read_npz(path, "file")
  except ValueError as e:
    assert str(e).startswith("file"), str(e)


# --- 6. solver, fit, choose and runtime arguments ---------------------------------------

def test_negative_transition_entry_is_named():
  model, _ = jexit.fit(traces(), num_bins=3)
  trans = model.trans.copy()
  trans[1, 2, 0], trans[1, 2, 1] = -0.25, trans[1, 2, 1] + trans[1, 2, 0] + 0.25
  with pytest.raises(ValueError, match=r"model.trans: expected probabilities >= 0, got "
                                       r"-0.25 at index \(1, 2, 0\)"):
    jexit.solve(model._replace(trans=trans), np.array([0.1]))


@pytest.mark.parametrize("step", [INF, NAN, -INF, 0.0, -0.1, "0.1"])
def test_step_must_be_finite_and_positive(step):
  with pytest.raises(ValueError, match="^step: expected"):
    jexit.fit(traces(), bins="uniform", step=step)


@FEW
@given(max_bytes=st.sampled_from(["big", -1, 0, NAN, INF, True, [1], 1, 10.0]),
       rtol=st.sampled_from([None, -1.0, NAN, "x"]),
       lam=st.sampled_from([[0.1, 1, 2], [NAN, 1, 2], [-1, 1, 2], [1e39, 1, 2], ["a", 1, 2]]))
def test_solve_arguments(max_bytes, rtol, lam):
  model, _ = jexit.fit(traces(), num_bins=3)
  with pytest.raises(ValueError) as e:
    jexit.solve(model, np.array(lam, dtype=object) if "a" in lam else np.array(lam),
                max_bytes=max_bytes, rtol=rtol)
  assert_names(e, "max_bytes", "rtol", "lambdas")


@pytest.mark.parametrize("budget", ["0.01", NAN, -0.5, 2.0, None, [0.01]])
def test_budgets_are_shown_with_repr(budget):
  with pytest.raises(ValueError, match=r"max_loss: expected an agreement-loss budget") as e:
    jexit.choose(traces(), budget)
  assert repr(budget) in str(e.value)
  if not isinstance(budget, list):  # apparate_greedy takes a list of budgets
    with pytest.raises(ValueError, match="max_loss: expected an agreement-loss budget"):
      baselines.apparate_greedy(traces(), budget)


@FUZZ
@given(k=st.one_of(st.integers(-3, 5), st.sampled_from([1.0, "0", None, True, np.int64(1)])),
       v=st.one_of(st.sampled_from(EXTREME), st.sampled_from(["0.1", None, [0.1], True])),
       best_loss=st.sampled_from([INF, 0.0, 0.5, "x", None]),
       best_ramp=st.sampled_from([-1, 0, 1, 7, -5, 0.5, "0"]))
def test_decide_one_checks_or_agrees_with_step(table, k, v, best_loss, best_ramp):
  try:
    stop, loss, ramp = table.decide_one(k, v, best_loss, best_ramp)
  except ValueError as e:
    assert str(e).split(":")[0] in ("k", "v", "best_loss", "best_ramp") \
        or str(e).startswith("signal at ramp"), str(e)
    return
  assert isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 0 <= k < 3
  assert isinstance(best_ramp, int) and -1 <= best_ramp < k
  state = jexit.runtime.ExitState(best_loss=np.asarray(best_loss, table.dtype),
                                  best_ramp=np.asarray(best_ramp), ramp=np.asarray(k))
  want = table._decide(int(k), np.asarray(float(v)), state.best_loss, state.best_ramp)
  assert (stop, loss, ramp) == (bool(want[0]), float(want[1]), int(want[2]))


@pytest.mark.parametrize("args, field", [
    ((-1, 0.9, 0), "k"), ((3, 0.9, 0), "k"), ((1.0, 0.9, 0), "k"), (("0", 0.9, 0), "k"),
    ((0, "0.9", 0), "conf"), ((0, None, 0), "conf"), ((0, 0.9, 1.5), "pred"),
    ((1, 0.9, 0, "1"), "prev_pred"),
])
def test_signal_one_checks_its_arguments(table, args, field):
  with pytest.raises(ValueError, match=f"^{field}: expected"):
    table.signal_one(*args)


# --- 5. and the CLI: one line, exit 2, the flag named ------------------------------------

def run_cli(capsys, argv):
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def assert_cli_error(rc, err, flag):
  assert rc == 2 and err.startswith("jexit: error:") and err.count("\n") == 1, err
  assert flag in err, (flag, err)


_OUTPUT_ARGV = {"sweep": ["sweep", "{trace}"], "budget": ["budget", "{trace}"],
                "export": ["export", "{trace}", "--lam", "0.1"],
                "import-apparate": ["import-apparate", "{trace}", "--allow-pickle"],
                "record": ["record", "--arch", "vgg11", "--out", "{tmp}/ok.npz"],
                "demo": ["demo"]}
# Every output flag x every way its path can be wrong (generated, then the
# combinations that are not wrong dropped: a json may have any extension, a
# demo folder may be new with new parents).
_BAD_OUTPUTS = [
    (command, flag, kind)
    for command, flag in [("sweep", "--json"), ("sweep", "--plot"), ("budget", "--json"),
                          ("export", "--out"), ("import-apparate", "--out"), ("record", "--out"),
                          ("record", "--save-weights"), ("demo", "--out")]
    for kind in ("folder", "missing parent", "bad extension", "a file", "unwritable")
    if (kind != "bad extension" or flag == "--plot")
    and (kind == "a file") == (command == "demo")
    and (kind != "unwritable" or os.geteuid() != 0)]  # root writes anywhere


@pytest.mark.parametrize("command, flag, kind", _BAD_OUTPUTS)
def test_output_paths_checked_before_the_work(command, flag, kind, trace_file, tmp_path, capsys):
  path = {"folder": tmp_path, "missing parent": tmp_path / "no" / "x.out",
          "bad extension": tmp_path / "x.txt", "a file": trace_file,
          "unwritable": tmp_path / "ro" / "x.png"}[kind]
  if kind == "unwritable":
    (tmp_path / "ro").mkdir(mode=0o500)
  argv = [a.format(trace=trace_file, tmp=tmp_path) for a in _OUTPUT_ARGV[command]]
  if command == "record" and flag == "--out":
    argv = argv[:-2]
  rc, out, err = run_cli(capsys, argv + [flag, path])
  assert_cli_error(rc, err, flag)
  assert out == ""  # refused before any work printed anything


def _record_available():
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec("torch") is not None


BAD_FLAG_VALUES = {
    "--step": [INF, NAN, -1.0, 0.0, 1e-12],
    "--num-bins": [0, -3, 10 ** 6],
    "--smoothing": [-1.0, NAN, INF],
    "--loss-smoothing": [-1.0, NAN],
    "--num-lambdas": [0, -1, 10 ** 13],
    "--folds": [1, -1, 10 ** 6],
    "--block": [0, -1, 10 ** 6],
    "--seed": [-1],
    "--test-fraction": [0.0, 1.0, NAN, -0.5],
    "--max-loss": [NAN, 2.0, INF],
    "--signal-range": ["1,0", "nan,1", "-1e308,1e308", "0,1e39"],
}


@FUZZ
@given(command=st.sampled_from(["sweep", "budget"]),
       flag=st.sampled_from(sorted(BAD_FLAG_VALUES)), data=st.data())
def test_sweep_and_budget_bad_values_name_the_flag(command, flag, data, trace_file,
                                                   signal_trace_file, capsys):
  value = data.draw(st.sampled_from(BAD_FLAG_VALUES[flag]))
  # FLAG=VALUE: a value like -1 would otherwise read as a flag.
  argv = [command, signal_trace_file if flag == "--signal-range" else trace_file,
          f"{flag}={value}", "--num-lambdas", "5"]
  if flag == "--num-lambdas":
    argv = argv[:-2]
  if flag in ("--step",):
    argv += ["--bins", "uniform"]
  if flag == "--signal-range":
    argv += ["--signal", "signal"]
  if command == "budget" and flag == "--test-fraction":
    argv += ["--delta", "none"]
  if command == "budget" and flag == "--folds":
    argv += ["--delta", "none"]
  rc, _, err = run_cli(capsys, argv)
  assert_cli_error(rc, err, flag)


@FEW
@given(case=st.sampled_from([
    (["--lam", INF], "--lam"), (["--lam", NAN], "--lam"), (["--lam", -1], "--lam"),
    (["--max-loss", 0.01, "--grid", 0], "--grid"), (["--max-loss", 2.0], "--max-loss"),
    (["--max-loss", 0.01, "--block", 0], "--block"), (["--max-loss", 0.01, "--seed", -1],
                                                       "--seed"),
    (["--max-loss", 0.01, "--calibration-share", 1.5], "--calibration-share"),
]))
def test_export_bad_values_name_the_flag(case, trace_file, tmp_path_factory, capsys):
  argv, flag = case
  out = tmp_path_factory.mktemp("ex") / "p.npz"
  rc, _, err = run_cli(capsys, ["export", trace_file, "--out", out] + argv)
  assert_cli_error(rc, err, flag)
  assert not out.exists()


@pytest.mark.parametrize("cost, match", [
    ("1,a,1", "--cost: expected comma-separated numbers"),
    ("1e39,1,1", "traces.cost: expected 0 or magnitudes"),
    ("0,1,1", r"traces.cost: expected cost\[0\] > 0"),
    ("-1,1,1", "traces.cost: expected finite values >= 0"),  # passed as --cost=-1,1,1
])
def test_import_apparate_costs(cost, match, tmp_path, capsys):
  src = tmp_path / "p.pickle"
  src.write_bytes(pickle.dumps(PROFILE))
  rc, _, err = run_cli(capsys, ["import-apparate", src, "--out", tmp_path / "t.npz",
                                "--allow-pickle", f"--cost={cost}"])
  assert rc == 2 and err.startswith("jexit: error:") and err.count("\n") == 1, err
  assert re.search(match, err), err


@pytest.mark.parametrize("name", sorted(HOSTILE_PICKLES))
def test_import_apparate_hostile_pickles(name, tmp_path, capsys):
  src = tmp_path / "p.pickle"
  src.write_bytes(HOSTILE_PICKLES[name])
  out = tmp_path / "t.npz"
  rc, _, err = run_cli(capsys, ["import-apparate", src, "--out", out, "--allow-pickle"])
  assert rc == 2 and err.startswith("jexit: error: apparate file") and err.count("\n") == 1
  assert not out.exists()


def test_cli_trace_files_claiming_huge_shapes(tmp_path, capsys):
  path = tmp_path / "claim.npz"
  _npz_claiming(path, (10 ** 12, 64))
  for argv in (["sweep", path], ["budget", path], ["export", path, "--lam", "0.1", "--out",
                                                   tmp_path / "p.npz"]):
    rc, _, err = run_cli(capsys, argv)
    assert rc == 2 and err.startswith(f"jexit: error: trace file {path}: key 'conf'"), err


@pytest.mark.skipif(not _record_available(), reason="jexit record needs torch")
@pytest.mark.parametrize("argv, flag", [
    (["--size", "8"], "--size"), (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--trace-frac", "nan"], "--trace-frac"),
])
def test_record_bad_values(argv, flag, tmp_path, capsys):
  rc, _, err = run_cli(capsys, ["record", "--arch", "vgg11", "--out", tmp_path / "t.npz"]
                       + argv)
  assert_cli_error(rc, err, flag)


def test_name_flag_maps_fields_to_flags():
  parser = cli.build_parser()
  sweep = cli._subparser(parser, "sweep")
  export = cli._subparser(parser, "export")
  assert cli._name_flag("num_bins=10000: [63, 1, 1] ...", sweep) == "--num-bins=10000: [63, 1, 1] ..."
  assert cli._name_flag("loss_smoothing: expected", sweep) == "--loss-smoothing: expected"
  assert cli._name_flag("num_lambdas: 5 lam values", export) == "--grid: 5 lam values"
  assert cli._name_flag("traces.cost: expected", sweep) == "traces.cost: expected"
  assert cli._name_flag("model: one policy", sweep) == "model: one policy"


def test_cli_zero_cost_first_ramp(tmp_path, capsys):
  """A free first ramp made `speedup inf`, a divide warning and "inf" in the JSON."""
  t = traces()
  path = tmp_path / "t.npz"
  np.savez(path, conf=t.conf, pred=t.pred, cost=np.array([0.0, 1.0, 1.0]))
  rc, _, err = run_cli(capsys, ["sweep", path, "--json", tmp_path / "f.json"])
  assert rc == 2 and r"traces.cost: expected cost[0] > 0" in err and err.count("\n") == 1
  assert not (tmp_path / "f.json").exists()
