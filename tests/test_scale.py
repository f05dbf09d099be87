"""Scale paths of the solver: memory-bounded blocks and sharding over devices.

Every path must give the policies of the plain one-block, one-device call.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jexit
from jexit import solver as solver_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNLIMITED = 1 << 40  # a budget that keeps any test batch in one block


def _models(rng, m, k, s, *, conditioned=False):
  init = rng.dirichlet(np.ones(s), size=m)
  loss = rng.uniform(size=(m, k, s))
  cost = rng.uniform(0.1, 1.0, size=(m, k))
  if conditioned:
    trans = rng.dirichlet(np.ones(s), size=(m, k - 1, k * s, s))
  else:
    trans = rng.dirichlet(np.ones(s), size=(m, k - 1, s))
  return jexit.ExitModel(init=init, trans=trans, loss=loss, cost=cost)


def _assert_same(a, b):
  """Same policies; values to float32 rounding (block size changes GEMM order)."""
  np.testing.assert_allclose(np.asarray(a.value), np.asarray(b.value), rtol=2e-6)
  np.testing.assert_array_equal(np.asarray(a.threshold), np.asarray(b.threshold))
  assert (a.stop is None) == (b.stop is None)
  if a.stop is not None:
    np.testing.assert_array_equal(np.asarray(a.stop), np.asarray(b.stop))


def _bytes(model, num_l, *, recall=True, return_stop=False):
  """`(one policy, the whole batch)`: estimated working bytes."""
  prep = solver_lib._prepare(model, np.float32)
  m, k, s = prep.loss.shape
  per_model, per_policy = solver_lib.solve_bytes(
      prep.grid.shape[1], s, k, recall=recall, return_stop=return_stop,
      conditioned=prep.conditioned)
  return per_model + per_policy, m * (per_model + num_l * per_policy)


def _blocks(model, num_l, max_bytes, *, recall=True, return_stop=False):
  """How many blocks `solve` splits the batch into under `max_bytes`."""
  prep = solver_lib._prepare(model, np.float32)
  m, k, s = prep.loss.shape
  per = solver_lib.solve_bytes(prep.grid.shape[1], s, k, recall=recall,
                               return_stop=return_stop, conditioned=prep.conditioned)
  mc, lc = solver_lib._block_shape(m, num_l, *per, max_bytes, (1, 1))
  return -(-m // mc) * -(-num_l // lc)


@pytest.mark.parametrize("recall", [True, False])
@pytest.mark.parametrize("return_stop", [False, True])
def test_chunked_equals_unchunked(recall, return_stop):
  model = _models(np.random.default_rng(0), 3, 4, 6)
  lam = np.geomspace(1e-3, 2, 37)  # 37: blocks do not divide L, so padding is used
  whole = jexit.solve(model, lam, recall=recall, return_stop=return_stop,
                      max_bytes=UNLIMITED)
  assert _blocks(model, 37, UNLIMITED, recall=recall, return_stop=return_stop) == 1
  one, total = _bytes(model, 37, recall=recall, return_stop=return_stop)
  for max_bytes in (3 * one, total // 2):
    assert _blocks(model, 37, max_bytes, recall=recall, return_stop=return_stop) > 1
    chunked = jexit.solve(model, lam, recall=recall, return_stop=return_stop,
                          max_bytes=max_bytes)
    _assert_same(whole, chunked)


def test_chunked_state_conditioned_and_single_model():
  rng = np.random.default_rng(1)
  cond = _models(rng, 1, 3, 4, conditioned=True)
  cond = cond._replace(**{f: getattr(cond, f)[0] for f in cond._fields})
  lam = np.geomspace(1e-3, 1, 11)
  whole = jexit.solve(cond, lam, return_stop=True, max_bytes=UNLIMITED)
  chunked = jexit.solve(cond, lam, return_stop=True, max_bytes=3_000)
  assert chunked.threshold.shape == (11, 3, 4)
  _assert_same(whole, chunked)


def test_many_models_few_lambdas_chunk_over_models():
  model = _models(np.random.default_rng(2), 9, 3, 5)
  lam = np.array([0.05, 0.5])
  whole = jexit.solve(model, lam, max_bytes=UNLIMITED)
  chunked = jexit.solve(model, lam, max_bytes=4_000)
  assert _blocks(model, 2, 4_000) > 1
  _assert_same(whole, chunked)


def test_no_recompilation_for_a_new_lambda_grid_under_chunking():
  model = _models(np.random.default_rng(3), 2, 4, 5)
  max_bytes = 20_000
  assert _blocks(model, 50, max_bytes) > 1
  jexit.solve(model, np.geomspace(1e-3, 1, 50), max_bytes=max_bytes)
  before = solver_lib._solve_batched._cache_size()
  jexit.solve(model, np.geomspace(1e-2, 5, 50), max_bytes=max_bytes)
  jexit.solve(model, np.linspace(0, 1, 50), max_bytes=max_bytes)
  assert solver_lib._solve_batched._cache_size() == before


def test_hundred_thousand_policies_in_one_call():
  # A cheap small-S stand-in for benchmarks/bench_solver.py --big.
  model = _models(np.random.default_rng(4), 4, 3, 3)
  lam = np.geomspace(1e-4, 10, 25_000)
  policy = jexit.solve(model, lam, max_bytes=1 << 20)
  assert policy.threshold.shape == (4, 25_000, 3, 3)
  assert _blocks(model, 25_000, 1 << 20) > 1
  pick = np.array([0, 1, 12_345, 24_999])
  alone = jexit.solve(model, lam[pick], max_bytes=UNLIMITED)
  np.testing.assert_allclose(np.asarray(policy.value)[:, pick], alone.value, rtol=2e-6)
  np.testing.assert_array_equal(np.asarray(policy.threshold)[:, pick], alone.threshold)


def test_memory_estimate_bounds_xla_buffers():
  """`solve_bytes` is an upper bound of what XLA allocates for one block."""
  for (m, l, k, s), recall, return_stop in [((3, 200, 3, 13), True, False),
                                           ((1, 8, 8, 32), True, False),
                                           ((2, 16, 5, 16), True, True),
                                           ((2, 64, 5, 16), False, True)]:
    model = _models(np.random.default_rng(5), m, k, s)
    prep = solver_lib._prepare(model, np.float32)
    compiled = solver_lib._solve_batched.lower(
        prep.grid, prep.idx, prep.init, prep.trans, prep.loss, prep.cost,
        np.ones((m, l), np.float32), np.float32(1e-5), recall=recall,
        conditioned=False, return_stop=return_stop).compile()
    stats = compiled.memory_analysis()
    if stats is None:
      pytest.skip("this backend reports no memory analysis")
    used = (stats.temp_size_in_bytes + stats.output_size_in_bytes
            + stats.argument_size_in_bytes)
    per_model, per_policy = solver_lib.solve_bytes(
        prep.grid.shape[1], s, k, recall=recall, return_stop=return_stop)
    assert used <= m * (per_model + l * per_policy), (m, l, k, s, recall, return_stop)


def test_bad_budget_and_devices_are_refused():
  model = _models(np.random.default_rng(6), 1, 3, 4)
  with pytest.raises(ValueError, match="max_bytes"):
    jexit.solve(model, np.array([0.1]), max_bytes=10)
  with pytest.raises(ValueError, match="max_bytes"):
    jexit.solve(model, np.array([0.1]), max_bytes=0)
  with pytest.raises(ValueError, match="devices"):
    jexit.solve(model, np.array([0.1]), devices="some")
  with pytest.raises(ValueError, match="devices"):
    jexit.solve(model, np.array([0.1]), devices=[])


def test_one_device_list_equals_default():
  import jax
  model = _models(np.random.default_rng(7), 2, 3, 4)
  lam = np.geomspace(1e-3, 1, 5)
  _assert_same(jexit.solve(model, lam), jexit.solve(model, lam, devices=jax.devices()[:1]))


SHARDED = textwrap.dedent("""
    import re
    import numpy as np
    import jax
    import jexit
    from jexit import solver as solver_lib
    from test_scale import _assert_same, _models

    assert jax.local_device_count() == 4, jax.devices()
    rng = np.random.default_rng(8)
    # (models, lam values, state-conditioned, recall, return_stop, budgets)
    cases = [(3, 37, False, True, True, (1 << 40, 6_000)),
             (3, 37, False, False, False, (1 << 40, 6_000)),
             (8, 2, False, True, False, (1 << 40,)),
             (1, 1, False, True, False, (1 << 40,)),
             (2, 6, True, True, True, (1 << 40,))]
    for m, l, conditioned, recall, return_stop, budgets in cases:
      model = _models(rng, m, 3, 5, conditioned=conditioned)
      lam = np.geomspace(1e-3, 1, l)
      one = jexit.solve(model, lam, recall=recall, return_stop=return_stop,
                        max_bytes=1 << 40)
      for max_bytes in budgets:
        four = jexit.solve(model, lam, recall=recall, return_stop=return_stop,
                           max_bytes=max_bytes, devices="all")
        _assert_same(one, four)
    _assert_same(one, jexit.solve(model, lam, return_stop=True, max_bytes=1 << 40,
                                  devices=jax.devices()[1:3]))

    # One block over the ("model", "lam") mesh: sharded output, no collectives.
    model = _models(rng, 2, 3, 5)
    policy = jexit.solve(model, np.geomspace(1e-3, 1, 8), devices="all",
                         max_bytes=1 << 40)
    assert len(policy.threshold.sharding.device_set) == 4, policy.threshold.sharding
    mesh = solver_lib._make_mesh("all", 2, 8)
    prep = solver_lib._prepare(model, np.float32)
    hlo = solver_lib._solve_batched.lower(
        prep.grid, prep.idx, prep.init, prep.trans, prep.loss, prep.cost,
        np.ones((2, 8), np.float32), np.float32(1e-5), recall=True,
        conditioned=False, return_stop=False, mesh=mesh).compile().as_text()
    assert not re.search("all-gather|all-reduce|all-to-all|collective-permute", hlo)
    print("SHARDED OK")
""")


def test_sharded_equals_single_device():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=4").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
  result = subprocess.run([sys.executable, "-c", SHARDED], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "SHARDED OK" in result.stdout, (
      result.stdout[-2000:] + result.stderr[-4000:])
