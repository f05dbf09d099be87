"""Batched Bellman solver for exit policies with and without recall.

A kernel solves one model for one lam with `lax.scan(reverse=True)` over the
ramps; `solve` vmaps it over lam and models and is the one place that jits.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jexit.types import ExitModel, Policy


def working_dtype():
  """float64 when JAX x64 is enabled, else float32."""
  return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def default_rtol(dtype) -> float:
  """Relative tie tolerance: ties (stop == continue) resolve to stop."""
  return 1e-9 if np.dtype(dtype) == np.float64 else 1e-5


class _Prepared(NamedTuple):
  """A model batch on the host, ready for the kernels (leading [M])."""
  grid: np.ndarray   # [M, X] sorted distinct losses, padded with the largest
  idx: np.ndarray    # [M, K, S] index of loss[k, s] in grid
  init: np.ndarray   # [M, S]
  trans: np.ndarray  # [M, K-1, S, S] or [M, K-1, X, S, S]
  loss: np.ndarray   # [M, K, S]
  cost: np.ndarray   # [M, K]
  batched: bool
  conditioned: bool


def _check_finite(name, a):
  if not np.all(np.isfinite(a)):
    raise ValueError(f"model.{name}: expected finite values, got NaN or inf")


def check_model(model: ExitModel, *, atol: float = 1e-5) -> ExitModel:
  """Validates shapes and values of an `ExitModel` (single or batched).

  Raises:
    ValueError: naming the field, the expected shape and the one found.
  """
  if not isinstance(model, ExitModel):
    raise ValueError(f"model: expected jexit.ExitModel, got {type(model).__name__}")
  init, trans, loss, cost = (np.asarray(a, np.float64) for a in model)
  if init.ndim not in (1, 2):
    raise ValueError(f"model.init: expected shape [S] or [M, S], got {init.shape}")
  batched = init.ndim == 2
  lead = init.shape[:1] if batched else ()
  s = init.shape[-1]
  if loss.ndim != init.ndim + 1 or loss.shape[:len(lead)] != lead or loss.shape[-1] != s:
    raise ValueError(f"model.loss: expected shape {list(lead) + ['K', s]} "
                     f"(init has shape {init.shape}), got {loss.shape}")
  k = loss.shape[-2]
  if k < 1:
    raise ValueError(f"model.loss: expected at least one ramp, got shape {loss.shape}")
  if cost.shape != lead + (k,):
    raise ValueError(f"model.cost: expected shape {lead + (k,)}, got {cost.shape}")
  plain = lead + (k - 1, s, s)
  if trans.shape != plain and not (
      trans.ndim == len(plain) + 1 and trans.shape[:len(lead) + 1] == lead + (k - 1,)
      and trans.shape[-2:] == (s, s)):
    raise ValueError(f"model.trans: expected shape {plain} or state-conditioned "
                     f"{lead + (k - 1, 'X', s, s)}, got {trans.shape}")
  for name, a in (("init", init), ("trans", trans), ("loss", loss), ("cost", cost)):
    _check_finite(name, a)
  if np.any(cost < 0):
    raise ValueError(f"model.cost: expected values >= 0, got {cost.tolist()}")
  if np.any(init < 0) or np.any(np.abs(init.sum(-1) - 1) > atol):
    raise ValueError(f"model.init: expected a probability vector (>= 0, sums to 1), "
                     f"got sums {np.round(init.sum(-1), 6).tolist()}")
  if trans.size:
    sums = trans.sum(-1)
    if np.any(trans < 0) or np.any(np.abs(sums - 1) > atol):
      worst = np.unravel_index(np.argmax(np.abs(sums - 1)), sums.shape)
      raise ValueError(f"model.trans: expected rows >= 0 that sum to 1, got a row "
                       f"summing to {sums[worst]:.6g} at index {tuple(int(i) for i in worst)}")
  return ExitModel(init=init, trans=trans, loss=loss, cost=cost)


def _prepare(model: ExitModel, dtype) -> _Prepared:
  model = check_model(model)
  batched = model.init.ndim == 2
  add = (lambda a: a) if batched else (lambda a: a[None])
  init, trans, loss, cost = (add(a) for a in model)
  m, k, s = loss.shape
  conditioned = trans.ndim == 5
  # Distinct losses are taken in the working dtype, so the thresholds (grid
  # values) compare exactly against the losses evaluation looks up.
  loss = loss.astype(dtype)
  grids = [np.unique(loss[i]) for i in range(m)]
  x = max(len(g) for g in grids)
  grid = np.stack([np.pad(g, (0, x - len(g)), mode="edge") for g in grids])
  idx = np.stack([np.searchsorted(grids[i], loss[i]) for i in range(m)]).astype(np.int32)
  if conditioned:
    for i, g in enumerate(grids):
      if trans.shape[2] != len(g) and not (trans.shape[2] == x and batched):
        raise ValueError(f"model.trans: state-conditioned axis X must equal the number "
                         f"of distinct loss values ({len(g)}), got {trans.shape[2]}")
  return _Prepared(grid=grid, idx=idx, init=init.astype(dtype), trans=trans.astype(dtype),
                   loss=loss, cost=cost.astype(dtype), batched=batched,
                   conditioned=conditioned)


def _recall_kernel(grid, idx, init, trans, cost, lam, rtol, *, conditioned):
  """Recall policy for one model and one lam (PROBLEM.md, Algorithm 1).

    W_K(x, s) = grid[x]
    W_k(x, s) = min(grid[x], lam c_{k+1} + sum_b trans_k[s, b] W_{k+1}(min(x, idx_{k+1}(b)), b))
    value     = lam c_1 + sum_a init[a] W_1(idx_1(a), a)

  Args:
    grid: `[X]` sorted distinct losses. idx: `[K, S]` int. init: `[S]`.
    trans: `[K-1, S, S]` (or `[K-1, X, S, S]` if conditioned). cost: `[K]`.
    lam: scalar. rtol: scalar tie tolerance.

  Returns:
    `(value, stop)`: scalar, and `[K, X, S]` bool stop decisions.
  """
  num_x, = grid.shape
  xs = jnp.arange(num_x)
  stop_value = jnp.broadcast_to(grid[:, None], (num_x, idx.shape[1]))  # [X, S]

  def step(w_next, inputs):
    trans_k, idx_next, cost_next = inputs
    # G[x, b] = W_{k+1}(min(x, idx_{k+1}(b)), b): the gather of the recursion.
    g = jnp.take_along_axis(w_next, jnp.minimum(xs[:, None], idx_next[None, :]), axis=0)
    if conditioned:
      expected = jnp.einsum("xsb,xb->xs", trans_k, g)
    else:
      expected = g @ trans_k.T  # the GEMM: [X, S] x [S, S]
    cont = lam * cost_next + expected
    stop = stop_value <= cont + rtol * (1 + jnp.abs(cont))
    return jnp.where(stop, stop_value, cont), stop

  w_1, stops = jax.lax.scan(step, stop_value, (trans, idx[1:], cost[1:]), reverse=True)
  value = lam * cost[0] + init @ w_1[idx[0], jnp.arange(idx.shape[1])]
  last = jnp.ones((1,) + stop_value.shape, bool)
  return value, jnp.concatenate([stops, last], axis=0)


def _norecall_kernel(loss, init, trans, cost, lam, rtol):
  """No-recall policy for one model and one lam.

    U_K(s) = l_K(s);  U_k(s) = min(l_k(s), lam c_{k+1} + sum_b trans_k[s, b] U_{k+1}(b))
    value  = lam c_1 + sum_a init[a] U_1(a)

  Returns:
    `(value, stop)`: scalar, and `[K, S]` bool stop decisions.
  """
  def step(u_next, inputs):
    trans_k, loss_k, cost_next = inputs
    cont = lam * cost_next + trans_k @ u_next
    stop = loss_k <= cont + rtol * (1 + jnp.abs(cont))
    return jnp.where(stop, loss_k, cont), stop

  u_1, stops = jax.lax.scan(step, loss[-1], (trans, loss[:-1], cost[1:]), reverse=True)
  value = lam * cost[0] + init @ u_1
  return value, jnp.concatenate([stops, jnp.ones((1,) + loss.shape[1:], bool)], axis=0)


def _recall_thresholds(stop, grid):
  """`[K, S]` thresholds from `[K, X, S]` decisions: the largest x of the stop prefix."""
  prefix = jnp.cumprod(stop.astype(jnp.int32), axis=1)
  count = prefix.sum(axis=1)  # [K, S]
  value = grid[jnp.maximum(count - 1, 0)]
  threshold = jnp.where(count > 0, value, -jnp.inf)
  return threshold.at[-1].set(jnp.inf)


@functools.partial(jax.jit, static_argnames=("recall", "conditioned", "return_stop"))
def _solve_batched(grid, idx, init, trans, loss, cost, lam, rtol, *,
                   recall, conditioned, return_stop):
  """`[M]` models x `[L]` lam values; returns value [M, L], threshold [M, L, K, S]."""
  if recall:
    def one(grid, idx, init, trans, cost, lam):
      value, stop = _recall_kernel(grid, idx, init, trans, cost, lam, rtol,
                                   conditioned=conditioned)
      return value, _recall_thresholds(stop, grid), stop
    over_lam = jax.vmap(one, in_axes=(None, None, None, None, None, 0))
    value, threshold, stop = jax.vmap(over_lam)(grid, idx, init, trans, cost, lam)
  else:
    def one(loss, init, trans, cost, lam):
      value, stop = _norecall_kernel(loss, init, trans, cost, lam, rtol)
      threshold = jnp.where(stop, loss, -jnp.inf).at[-1].set(jnp.inf)
      return value, threshold, stop
    over_lam = jax.vmap(one, in_axes=(None, None, None, None, 0))
    value, threshold, stop = jax.vmap(over_lam)(loss, init, trans, cost, lam)
  return value, threshold, (stop if return_stop else None)


def solve(model: ExitModel, lambdas, *, recall: bool = True,
          rtol: Optional[float] = None, return_stop: bool = False) -> Policy:
  """Optimal exit policies for every lam in `lambdas` (and every model).

  Minimises `E[loss of the output ramp + lam * cost of the ramps run]`
  (PROBLEM.md). With recall, the output is the ramp with the best loss so far
  (the latest on ties); without, the current ramp.

  Args:
    model: an `ExitModel`, optionally with a leading `[M]` batch axis on every
      field; `trans` may be state-conditioned `[K-1, X, S, S]` (recall only;
      X = the number of distinct values of `loss`, in the working dtype). The
      stop set is then not always a down-set in x: `threshold` keeps the
      largest stop prefix (it never stops where the optimum continues) and
      `return_stop=True` gives the exact decisions.
    lambdas: `[L]` cost weights, finite and >= 0.
    recall: solve the recall (True) or the no-recall (False) problem.
    rtol: relative tie tolerance (default 1e-5 in float32, 1e-9 in float64);
      ties resolve to stop.
    return_stop: also return the full decision table `Policy.stop`
      `[..., L, K, X, S]` (recall) or `[..., L, K, S]` (no recall).

  Returns:
    A `Policy` with `value [..., L]` and `threshold [..., L, K, S]`.

  Examples:
    >>> import numpy as np, jexit
    >>> s = 3
    >>> model = jexit.ExitModel(init=np.full(s, 1 / s),
    ...                         trans=np.full((1, s, s), 1 / s),
    ...                         loss=np.array([[0.1, 0.5, 0.9]] * 2),
    ...                         cost=np.ones(2))
    >>> policy = jexit.solve(model, np.array([0.01, 1.0]))
    >>> policy.threshold.shape, policy.value.shape
    ((2, 2, 3), (2,))
  """
  dtype = working_dtype()
  lam = np.asarray(lambdas, np.float64)
  if lam.ndim > 1 or lam.size == 0:
    raise ValueError(f"lambdas: expected a non-empty [L] array, got shape {lam.shape}")
  lam = np.atleast_1d(lam)
  if not np.all(np.isfinite(lam)) or np.any(lam < 0):
    bad = lam[~(np.isfinite(lam) & (lam >= 0))]
    raise ValueError(f"lambdas: expected finite values >= 0, got {bad[:5].tolist()}")
  prep = _prepare(model, dtype)
  if prep.conditioned and not recall:
    raise ValueError("model.trans: a state-conditioned trans [K-1, X, S, S] needs "
                     "recall=True (without recall the state is the bin alone)")
  m = prep.init.shape[0]
  lam_m = np.broadcast_to(lam.astype(dtype), (m, lam.size))
  tol = default_rtol(dtype) if rtol is None else float(rtol)
  value, threshold, stop = _solve_batched(
      prep.grid, prep.idx, prep.init, prep.trans, prep.loss, prep.cost, lam_m,
      jnp.asarray(tol, dtype), recall=recall, conditioned=prep.conditioned,
      return_stop=return_stop)
  grid = jnp.asarray(prep.grid)
  out = Policy(threshold=threshold, value=value, lam=jnp.asarray(lam_m),
               loss=jnp.asarray(prep.loss), cost=jnp.asarray(prep.cost),
               recall=recall, stop=stop, grid=grid if recall else None)
  if not prep.batched:
    out = out._replace(**{f: getattr(out, f)[0] for f in
                          ("threshold", "value", "lam", "loss", "cost", "stop", "grid")
                          if getattr(out, f) is not None})
  return out
