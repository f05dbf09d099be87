"""The unbatched kernels of the solver and of the expected objective, with and
without jit (`chex.variants`), against the float64 loops of tests/reference.py."""

import functools

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jexit import evaluation, solver
import reference


def _prepared(seed, k=4, s=5, conditioned=False):
  rng = np.random.default_rng(seed)
  init, trans, loss, cost = reference.random_model(rng, k, s, conditioned=conditioned)
  grid, idx = solver.loss_grid(loss, np.float32)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return (init, trans, loss, cost), (f32(grid), jnp.asarray(idx), f32(init), f32(trans),
                                    f32(cost))


class KernelTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0, 0.05, False), (1, 0.3, False), (2, 0.1, True))
  def test_recall_kernel_value_and_thresholds(self, seed, lam, conditioned):
    (init, trans, loss, cost), (grid, idx, init32, trans32, cost32) = _prepared(
        seed, conditioned=conditioned)
    kernel = self.variant(functools.partial(solver._recall_kernel, conditioned=conditioned,
                                            return_stop=True))
    value, threshold, stop = kernel(grid, idx, init32, trans32, cost32, jnp.float32(lam),
                                    jnp.float32(1e-5))
    k, s = loss.shape
    chex.assert_shape(threshold, (k, s))
    chex.assert_shape(stop, (k, grid.shape[0], s))
    chex.assert_tree_all_finite(value)
    ref_loss = np.asarray(loss, np.float32).astype(np.float64)
    want, choices, _ = reference.solve_recall(init, trans, ref_loss, cost, lam)
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    # Every decision the loops make by a clear margin, the kernel makes too.
    for kk in range(k - 1):
      for (x, ss), (sv, cv) in choices[kk].items():
        if abs(sv - cv) > 1e-4:
          assert bool(stop[kk, x, ss]) == (sv <= cv), (kk, x, ss)
    # The whole policy of the other variant: the same thresholds.
    if conditioned is False:
      again = solver._recall_kernel(grid, idx, init32, trans32, cost32, jnp.float32(lam),
                                    jnp.float32(1e-5), conditioned=False, return_stop=False)
      chex.assert_trees_all_close(threshold, again[1])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((3, 0.05), (4, 0.5))
  def test_norecall_kernel_value(self, seed, lam):
    (init, trans, loss, cost), _ = _prepared(seed)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    kernel = self.variant(solver._norecall_kernel)
    value, threshold, stop = kernel(f32(loss), f32(init), f32(trans), f32(cost),
                                    jnp.float32(lam), jnp.float32(1e-5))
    chex.assert_shape((threshold, stop), loss.shape)
    want, _ = reference.solve_norecall(init, trans, np.asarray(loss, np.float32).astype(
        np.float64), cost, lam)
    np.testing.assert_allclose(float(value), want, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((5, 0.05), (6, 0.2))
  def test_expected_objective_kernel_is_the_solved_value(self, seed, lam):
    # The forward pass of the optimal policy's table gives the Bellman value.
    _, (grid, idx, init32, trans32, cost32) = _prepared(seed)
    value, threshold, _ = solver._recall_kernel(grid, idx, init32, trans32, cost32,
                                                jnp.float32(lam), jnp.float32(1e-5),
                                                conditioned=False, return_stop=False)
    forward = self.variant(functools.partial(evaluation._expect_recall, conditioned=False))
    objective, exp_loss, exp_cost, stops = forward(grid, idx, init32, trans32, cost32,
                                                   threshold, jnp.float32(lam))
    chex.assert_shape(stops, (idx.shape[0],))
    np.testing.assert_allclose(float(objective), float(value), rtol=1e-5)
    np.testing.assert_allclose(float(stops.sum()), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(exp_loss + lam * exp_cost), float(objective), rtol=1e-6)
