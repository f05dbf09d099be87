"""Batched Bellman solver for exit policies with and without recall.

A kernel solves one model for one lam with `lax.scan(reverse=True)` over the
ramps; `solve` vmaps it over lam and models and is the one place that jits.
The `[M, L]` batch is solved in blocks that fit a memory budget (`max_bytes`;
cache-sized on a CPU), each block one call of the same compiled program, and
a block can be spread over devices with a ("model", "lam") mesh (`devices`).
Measurements: benchmarks/SOLVER.md.
"""

import functools
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jexit.checks import check_bytes, check_float32_range
from jexit.npzio import available_host_bytes
from jexit.types import ExitModel, Policy, is_bool_like, is_real_scalar


# Full float32 products on every backend: an accelerator's default (TF32 on
# NVIDIA GPUs, bf16 passes on TPUs) moves values by ~1e-4 and flips near-tied
# stop decisions (benchmarks/SOLVER.md, GPU table). CPUs ignore the setting.
PRECISION = jax.lax.Precision.HIGHEST
_mm = functools.partial(jnp.matmul, precision=PRECISION)


def working_dtype():
  """float64 when JAX x64 is enabled, else float32."""
  return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def loss_grid(loss, dtype=None) -> Tuple[np.ndarray, np.ndarray]:
  """`(grid [X], idx [K, S])`: the sorted distinct values of one model's loss
  table `[K, S]` in `dtype` (default: the working dtype), and the index of
  each entry in it. The recall state x indexes this grid; taking it in the
  working dtype makes thresholds compare exactly with the losses looked up."""
  cast = np.asarray(loss).astype(working_dtype() if dtype is None else dtype)
  grid = np.unique(cast)
  return grid, np.searchsorted(grid, cast).astype(np.int32)


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


def _real_array(name, a) -> np.ndarray:
  """`a` as float64, or a ValueError naming `name` (complex, text, ragged)."""
  try:
    arr = np.asarray(a)
  except ValueError:
    raise ValueError(f"{name}: expected a rectangular array of real numbers, got a "
                     f"ragged {type(a).__name__}") from None
  try:
    if arr.dtype.kind in "cSU":  # complex would lose its imaginary part, text is a mistake
      raise TypeError
    return arr.astype(np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: expected real numbers, got dtype {arr.dtype}") from None


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
  init, trans, loss, cost = (_real_array(f"model.{f}", a)
                              for f, a in zip(ExitModel._fields, model))
  if init.ndim not in (1, 2):
    raise ValueError(f"model.init: expected shape [S] or [M, S], got {init.shape}")
  batched = init.ndim == 2
  if batched and init.shape[0] == 0:
    raise ValueError(f"model.init: expected a batch of at least one model, got shape "
                     f"{init.shape}")
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
  check_float32_range("model.cost", cost)
  if np.any(init < 0) or np.any(np.abs(init.sum(-1) - 1) > atol):
    raise ValueError(f"model.init: expected a probability vector (>= 0, sums to 1), "
                     f"got sums {np.round(init.sum(-1), 6).tolist()}")
  if trans.size:
    if np.any(trans < 0):
      at = tuple(int(i) for i in np.argwhere(trans < 0)[0])
      raise ValueError(f"model.trans: expected probabilities >= 0, got "
                       f"{float(trans[at])!r} at index {at}")
    sums = trans.sum(-1)
    if np.any(np.abs(sums - 1) > atol):
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
  grids, idxs = zip(*(loss_grid(loss[i], dtype) for i in range(m)))
  x = max(len(g) for g in grids)
  if not conditioned:
    # X is at most K*S; padding it up to a multiple of S leaves at most K
    # shapes per (K, S), so refits (folds, signals) reuse compiled programs,
    # while models whose ramps share loss values (the paper's bins) keep
    # their small X. The padded rows repeat the largest loss and decide as
    # its row does.
    x = min(-(-x // s) * s, k * s)
  grid = np.stack([np.pad(g, (0, x - len(g)), mode="edge") for g in grids])
  idx = np.stack(idxs)
  if conditioned:
    for i, g in enumerate(grids):
      if trans.shape[2] != len(g) and not (trans.shape[2] == x and batched):
        raise ValueError(f"model.trans: state-conditioned axis X must equal the number "
                         f"of distinct loss values ({len(g)}), got {trans.shape[2]}")
  return _Prepared(grid=grid, idx=idx, init=init.astype(dtype), trans=trans.astype(dtype),
                   loss=loss, cost=cost.astype(dtype), batched=batched,
                   conditioned=conditioned)


def _recall_kernel(grid, idx, init, trans, cost, lam, rtol, *, conditioned, return_stop):
  """Recall policy for one model and one lam (PROBLEM.md, Algorithm 1).

    W_K(x, s) = grid[x]
    W_k(x, s) = min(grid[x], lam c_{k+1} + sum_b trans_k[s, b] G_{k+1}[x, b])
    G_k[x, b] = W_k(min(x, idx_k(b)), b)
    value     = lam c_1 + sum_a init[a] W_1(idx_1(a), a)

  The scan carries G (what the next GEMM reads) rather than W: per ramp one
  GEMM, one fused loop that compares, selects and builds the next G, and the
  stop-prefix count (benchmarks/SOLVER.md).

  Args:
    grid: `[X]` sorted distinct losses. idx: `[K, S]` int. init: `[S]`.
    trans: `[K-1, S, S]` (or `[K-1, X, S, S]` if conditioned). cost: `[K]`.
    lam: scalar. rtol: scalar tie tolerance.

  Returns:
    `(value, threshold, stop)`: scalar, `[K, S]` thresholds, and `[K, X, S]`
    bool stop decisions (None unless `return_stop`).
  """
  num_x, = grid.shape
  num_s = idx.shape[1]
  xs = jnp.arange(num_x)[:, None]  # [X, 1]
  stop_value = jnp.broadcast_to(grid[:, None], (num_x, num_s))  # [X, S]
  # The reduction over x is the one [X, S] array XLA materialises outside the
  # fused loop; int16 halves its bytes.
  count_dtype = jnp.int16 if num_x < 2 ** 15 else jnp.int32

  def stopping(stop_v, cont):
    return stop_v <= cont + rtol * (1 + jnp.abs(cont))  # ties resolve to stop

  def gathered(w, w_at, idx_k):
    """`G[x, b] = W(min(x, idx_k(b)), b)`: W itself where x <= idx_k(b), else
    the constant W(idx_k(b), b) (a select, so XLA fuses it; no [X, S] gather)."""
    return jnp.where(xs <= idx_k[None, :], w, w_at[None, :])

  def step(carry, inputs):
    g_next, _ = carry  # G_{k+1}: [X, S]
    trans_k, idx_k, cost_next = inputs
    if conditioned:
      expected = jnp.einsum("xsb,xb->xs", trans_k, g_next, precision=PRECISION)
    else:
      # The GEMM [X, S] x [S, S]; vmap over lam stacks the lam batch into its
      # rows: one [L*X, S] x [S, S] GEMM per model.
      expected = _mm(g_next, trans_k.T)
    cont = lam * cost_next + expected
    stop = stopping(stop_value, cont)
    # Threshold = the largest x of the stop prefix. Stop sets are down-sets
    # for lam > 0 (Theorem 4.5); the prefix keeps the threshold conservative
    # (never stops where continuing is optimal) when they are not.
    count = jnp.min(jnp.where(stop, num_x, xs).astype(count_dtype), axis=0)  # [S]
    # W_k = where(stop, grid, cont) is never stored, only G_k built from it;
    # W_k(idx_k(b), b) needs just the [S] rows of cont at idx_k.
    cont_at = jnp.take_along_axis(cont, idx_k[None, :], axis=0)[0]
    w_at = jnp.where(stopping(grid[idx_k], cont_at), grid[idx_k], cont_at)  # [S]
    g = gathered(jnp.where(stop, stop_value, cont), w_at, idx_k)
    return (g, w_at), (count.astype(jnp.int32), stop if return_stop else None)

  w_last_at = grid[idx[-1]]  # W_K(idx_K(b), b)
  carry = (gathered(stop_value, w_last_at, idx[-1]), w_last_at)
  (_, w_1_at), (counts, stops) = jax.lax.scan(
      step, carry, (trans, idx[:-1], cost[1:]), reverse=True)
  value = lam * cost[0] + _mm(init, w_1_at)
  threshold = jnp.where(counts > 0, grid[jnp.maximum(counts - 1, 0)], -jnp.inf)
  threshold = jnp.concatenate([threshold, jnp.full((1, num_s), jnp.inf, grid.dtype)])
  if return_stop:
    stops = jnp.concatenate([stops, jnp.ones((1, num_x, num_s), bool)], axis=0)
  return value, threshold, stops


def _norecall_kernel(loss, init, trans, cost, lam, rtol):
  """No-recall policy for one model and one lam.

    U_K(s) = l_K(s);  U_k(s) = min(l_k(s), lam c_{k+1} + sum_b trans_k[s, b] U_{k+1}(b))
    value  = lam c_1 + sum_a init[a] U_1(a)

  Returns:
    `(value, threshold, stop)`: scalar, `[K, S]` thresholds and `[K, S]` bool
    stop decisions.
  """
  def step(u_next, inputs):
    trans_k, loss_k, cost_next = inputs
    cont = lam * cost_next + _mm(trans_k, u_next)
    stop = loss_k <= cont + rtol * (1 + jnp.abs(cont))
    return jnp.where(stop, loss_k, cont), stop

  u_1, stops = jax.lax.scan(step, loss[-1], (trans, loss[:-1], cost[1:]), reverse=True)
  value = lam * cost[0] + _mm(init, u_1)
  stop = jnp.concatenate([stops, jnp.ones((1,) + loss.shape[1:], bool)], axis=0)
  threshold = jnp.where(stop, loss, -jnp.inf).at[-1].set(jnp.inf)
  return value, threshold, stop


@functools.partial(jax.jit,
                   static_argnames=("block", "recall", "conditioned", "return_stop", "mesh",
                                    "trim"))
def _solve_batched(grid, idx, init, trans, loss, cost, lam, rtol, start=(0, 0), *,
                   recall, conditioned, return_stop, block=None, mesh=None, trim=None):
  """`[M]` models x `[L]` lam values -> value `[M, L]`, threshold `[M, L, K, S]`.

  With `block = (Mb, Lb)` only the block of models `i:i+Mb` and lam values
  `j:j+Lb` at `start = (i, j)` is solved (the inputs stay on the device and
  each block is one cheap call). With a `mesh` (axes "model", "lam") every
  device solves the block at `start` of its own shard (`shard_map`, no
  communication); M and L must be multiples of the mesh's axis sizes.
  With `trim = (m, l, squeeze)` (one device) the outputs are cut to the
  first m models and l lam values, and the model axis is dropped if
  `squeeze`, inside the jit: eager slicing would compile one more small
  program per shape, which a fresh process pays for every time.
  """
  def solve_block(grid, idx, init, trans, loss, cost, lam, rtol, i, j):
    if block is not None:
      mb, lb = block
      take = lambda a: jax.lax.dynamic_slice_in_dim(a, i, mb, axis=0)
      grid, idx, init, trans, loss, cost = map(take, (grid, idx, init, trans, loss, cost))
      lam = jax.lax.dynamic_slice(lam, (i, j), (mb, lb))
    if recall:
      def one(grid, idx, init, trans, cost, lam):
        return _recall_kernel(grid, idx, init, trans, cost, lam, rtol,
                              conditioned=conditioned, return_stop=return_stop)
      over_lam = jax.vmap(one, in_axes=(None, None, None, None, None, 0))
      out = jax.vmap(over_lam)(grid, idx, init, trans, cost, lam)
    else:
      def one(loss, init, trans, cost, lam):
        return _norecall_kernel(loss, init, trans, cost, lam, rtol)
      over_lam = jax.vmap(one, in_axes=(None, None, None, None, 0))
      out = jax.vmap(over_lam)(loss, init, trans, cost, lam)
    value, threshold, stop = out
    return (value, threshold, stop) if return_stop else (value, threshold)

  args = (grid, idx, init, trans, loss, cost, lam, rtol) + tuple(start)
  if mesh is None:
    out = solve_block(*args)
  else:
    models, both = P("model"), P("model", "lam")
    # Each device's block is independent; check_vma=False because the scan
    # carry starts model-only and becomes lam-varying, which is fine here.
    out = jax.shard_map(solve_block, mesh=mesh,
                        in_specs=(models,) * 6 + (both, P(), P(), P()),
                        out_specs=(both,) * (3 if return_stop else 2),
                        check_vma=False)(*args)
  if trim is not None:
    m, l, squeeze = trim
    out = tuple(o[0, :l] if squeeze else o[:m, :l] for o in out)
  return out if return_stop else out + (None,)


# Default block on a CPU: the recursion streams its [X, S] buffers once per
# ramp, so a block that stays in the last-level cache runs 2-4x faster than one
# that does not (benchmarks/SOLVER.md). Accelerators take the largest block.
CPU_BLOCK_BYTES = 8 << 20


def _available_bytes(device) -> int:
  """Free memory of `device` (its allocator limit, or the host's free RAM)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  return available_host_bytes()


def default_max_bytes(devices: Sequence[jax.Device]) -> int:
  """The default working-memory budget per device for `solve(..., devices)`.

  Half of the first device's free memory (CPU devices of one host share it),
  and at most `CPU_BLOCK_BYTES` on a CPU.
  """
  first = devices[0]
  if first.platform == "cpu":
    return min(CPU_BLOCK_BYTES, _available_bytes(first) // (2 * len(devices)))
  return _available_bytes(first) // 2


def solve_bytes(num_x: int, num_s: int, num_k: int, *, recall: bool = True,
                return_stop: bool = False, conditioned: bool = False,
                itemsize: int = 4) -> Tuple[int, int]:
  """Working memory of the solver: `(bytes per model, bytes per policy)`.

  An upper estimate of what one `[M, L]` block holds at once on a device:
  the model's arrays, and per (model, lam) the recursion's `[X, S]` buffers
  (carry in and out, the gathered G, the GEMM result), the `[K, S]`
  thresholds and, with `return_stop`, the `[K, X, S]` stop table.
  """
  trans = (num_k - 1) * (num_x if conditioned else 1) * num_s * num_s
  per_model = itemsize * (trans + 3 * num_k * num_s + num_x + num_s + num_k)
  if recall:
    per_policy = 4 * itemsize * num_x * num_s + (itemsize + 4) * num_k * num_s
    if return_stop:
      per_policy += num_k * num_x * num_s
  else:
    per_policy = 6 * itemsize * num_s + (itemsize + 1) * num_k * num_s
  return per_model, per_policy + 2 * itemsize


def _block_shape(m, l, per_model, per_policy, budget, mesh_shape):
  """`(Mc, Lc)`: a block of the `[M, L]` batch whose working memory per device
  fits `budget`; multiples of the mesh axes, balanced to limit padding."""
  dm, dl = mesh_shape
  md, ld = -(-m // dm), -(-l // dl)  # per device, if the batch were one block
  need = lambda mc, lc: mc * (per_model + lc * per_policy)
  if need(1, 1) > budget:
    raise ValueError(f"max_bytes: one policy needs about {need(1, 1)} bytes of working "
                     f"memory, got a budget of {budget} bytes")
  if need(1, ld) <= budget:
    mc, lc = min(md, budget // need(1, ld)), ld
    mc = -(-md // -(-md // mc))  # the same number of blocks, evened out
  else:
    mc, lc = 1, min(ld, (budget - per_model) // per_policy)
    lc = -(-ld // -(-ld // lc))
  return mc * dm, lc * dl


def _make_mesh(devices, m, l):
  """A ("model", "lam") `Mesh` over `devices`, shaped to waste the least padding."""
  if isinstance(devices, str):
    if devices != "all":
      raise ValueError(f"devices: expected None, 'all' or a list of devices, got {devices!r}")
    devices = jax.local_devices()
  devices = list(devices)
  if not devices:
    raise ValueError("devices: expected at least one device, got an empty list")
  remote = [d for d in devices if d.process_index != jax.process_index()]
  if remote:
    # Blocks are copied back to this host; a multi-host run splits the lam
    # grid over processes instead (benchmarks/SOLVER.md, "Several hosts").
    raise ValueError(f"devices: expected devices of this process, got {len(remote)} of "
                     f"another (e.g. {remote[0]}); give each process its share of "
                     f"the lam grid and devices='all'")
  n = len(devices)
  # Every factorisation n = dm * dl: the least padded work, then the most on lam.
  shapes = [(n // dl, dl) for dl in range(n, 0, -1) if n % dl == 0]
  work = lambda sh: (-(-m // sh[0]) * sh[0]) * (-(-l // sh[1]) * sh[1])
  dm, dl = min(shapes, key=work)
  return Mesh(np.asarray(devices, dtype=object).reshape(dm, dl), ("model", "lam"))


def _pad_to(a, size, axis=0):
  """Repeats the last entry of `a` along `axis` up to `size` (valid padding)."""
  extra = size - a.shape[axis]
  if extra == 0:
    return a
  last = np.take(a, [-1], axis=axis)
  return np.concatenate([a, np.repeat(last, extra, axis=axis)], axis=axis)


def solve(model: ExitModel, lambdas, *, recall: bool = True,
          rtol: Optional[float] = None, return_stop: bool = False,
          max_bytes: Optional[int] = None,
          devices: Union[None, str, Sequence[jax.Device]] = None) -> Policy:
  """Optimal exit policies for every lam in `lambdas` (and every model).

  Minimises `E[loss of the output ramp + lam * cost of the ramps run]`
  (PROBLEM.md). With recall, the output is the ramp with the best loss so far
  (the latest on ties); without, the current ramp.

  The `[M, L]` batch of policies is solved in blocks whose working memory fits
  `max_bytes` per device (one compiled program for every block), and each
  block is split over `devices` along a ("model", "lam") mesh.

  Args:
    model: an `ExitModel`, optionally with a leading `[M]` batch axis on every
      field; `trans` may be state-conditioned `[K-1, X, S, S]` (recall only).
    lambdas: `[L]` cost weights, finite and >= 0.
    recall: solve the recall (True) or the no-recall (False) problem.
    rtol: relative tie tolerance (default 1e-5 in float32, 1e-9 in float64);
      ties resolve to stop.
    return_stop: also return the full decision table `Policy.stop`
      `[..., L, K, X, S]` (recall) or `[..., L, K, S]` (no recall).
    max_bytes: working-memory budget per device, in bytes, of one block of
      the batch (`solve_bytes` estimates it). Default `default_max_bytes`:
      a cache-sized block on a CPU, half of the free memory on an
      accelerator. The returned arrays are not counted here; a batch whose
      returned arrays would not fit in the host's free memory is refused
      with a ValueError before anything is solved.
    devices: None (the default device), "all" (every local device) or a list
      of devices to spread the batch over.

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
  lam = _real_array("lambdas", lambdas)
  if lam.ndim > 1 or lam.size == 0:
    raise ValueError(f"lambdas: expected a non-empty [L] array, got shape {lam.shape}")
  lam = np.atleast_1d(lam)
  if not np.all(np.isfinite(lam)) or np.any(lam < 0):
    bad = lam[~(np.isfinite(lam) & (lam >= 0))]
    raise ValueError(f"lambdas: expected finite values >= 0, got {bad[:5].tolist()}")
  if not is_bool_like(recall):
    raise ValueError(f"recall: expected a bool, got {recall!r}")
  recall = bool(recall)
  if rtol is not None and (not is_real_scalar(rtol) or not np.isfinite(rtol) or rtol < 0):
    raise ValueError(f"rtol: expected None or a finite tie tolerance >= 0, got {rtol!r}")
  if max_bytes is not None and not (is_real_scalar(max_bytes) and np.isfinite(max_bytes)
                                    and max_bytes > 0):
    raise ValueError(f"max_bytes: expected a positive number of bytes, got {max_bytes!r}")
  prep = _prepare(model, dtype)
  if prep.conditioned and not recall:
    raise ValueError("model.trans: a state-conditioned trans [K-1, X, S, S] needs "
                     "recall=True (without recall the state is the bin alone)")
  m, num_k, num_s = prep.loss.shape
  num_x, num_l = prep.grid.shape[1], lam.size
  with np.errstate(over="ignore"):
    lam_w = lam.astype(dtype)
  if not np.all(np.isfinite(lam_w)):
    raise ValueError(f"lambdas: expected values <= {float(np.finfo(dtype).max):.4g} (the "
                     f"range of {np.dtype(dtype).name}), got {lam[~np.isfinite(lam_w)][:5].tolist()}")
  lam_m = np.broadcast_to(lam_w, (m, num_l))
  tol = default_rtol(dtype) if rtol is None else float(rtol)

  mesh = None if devices is None else _make_mesh(devices, m, num_l)
  used = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
  mesh_shape = (1, 1) if mesh is None else tuple(mesh.devices.shape)
  per_model, per_policy = solve_bytes(num_x, num_s, num_k, recall=recall,
                                      return_stop=return_stop,
                                      conditioned=prep.conditioned,
                                      itemsize=np.dtype(dtype).itemsize)
  out_bytes = m * num_l * (1 + num_k * num_s) * np.dtype(dtype).itemsize
  if return_stop:
    out_bytes += m * num_l * num_k * (num_x if recall else 1) * num_s
  free = available_host_bytes()
  if out_bytes > free:
    raise ValueError(
        f"lambdas: {num_l} lam values x {m} model(s) need about {out_bytes / 2**30:.1f} GiB "
        f"for the solved tables; about {free / 2**30:.1f} GiB is free. "
        f"Solve fewer lam values per call.")
  # A block holds at least one policy: refuse one the host cannot hold.
  check_bytes("model", None, f"one policy's working memory (K={num_k} ramps, S={num_s} bins, "
              f"X={num_x} loss values)", per_model + per_policy,
              hint="fit fewer bins")
  if max_bytes is None:  # at least one policy per block
    budget = max(default_max_bytes(used), per_model + per_policy)
  else:
    budget = int(max_bytes)
  mc, lc = _block_shape(m, num_l, per_model, per_policy, budget, mesh_shape)

  # Padding repeats the last model / lam, so padded policies are valid ones.
  m_pad, l_pad = -(-m // mc) * mc, -(-num_l // lc) * lc
  models = [_pad_to(a, m_pad) for a in
            (prep.grid, prep.idx, prep.init, prep.trans, prep.loss, prep.cost)]
  lam_pad = _pad_to(_pad_to(lam_m, m_pad, 0), l_pad, 1)
  if mesh is None:
    put = lambda a, spec: jax.device_put(a, used[0])
  else:
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  # The whole (small) input goes to the devices once; each call then solves
  # the block at `start` of every device's shard.
  inputs = [put(a, P("model")) for a in models]
  inputs += [put(lam_pad, P("model", "lam")), put(np.asarray(tol, dtype), P())]
  dm, dl = mesh_shape
  md, ld = m_pad // dm, l_pad // dl  # one device's shard
  mb, lb = mc // dm, lc // dl        # one device's block
  starts = [(i, j) for i in range(0, md, mb) for j in range(0, ld, lb)]
  run = functools.partial(_solve_batched, *inputs, recall=recall,
                          conditioned=prep.conditioned, return_stop=return_stop,
                          mesh=mesh)
  squeeze = not prep.batched
  if len(starts) == 1 and mesh is None:
    value, threshold, stop = run(trim=(m, num_l, squeeze))
  elif len(starts) == 1:
    value, threshold, stop = run()
    if (m_pad, l_pad) != (m, num_l):
      value, threshold, stop = (a if a is None else a[:m, :num_l]
                                for a in (value, threshold, stop))
    if squeeze:
      value, threshold, stop = (a if a is None else a[0] for a in (value, threshold, stop))
  else:
    value = np.empty((m_pad, l_pad), dtype)
    threshold = np.empty((m_pad, l_pad, num_k, num_s), dtype)
    stop = None
    if return_stop:
      stop = np.empty((m_pad, l_pad, num_k) + ((num_x,) if recall else ()) + (num_s,),
                      bool)
    # The next block is dispatched before the last one is copied out, so at
    # most two blocks are alive at once.
    pending = None
    for start in starts + [None]:
      current = None
      if start is not None:
        current = start, run(tuple(np.int32(v) for v in start), block=(mb, lb))
      if pending is not None:
        (i, j), outs = pending
        for dst, src in zip((value, threshold, stop), outs):
          if dst is not None:
            # Rows of device a are a * md + i + [0, mb): a strided view.
            view = dst.reshape((dm, md, dl, ld) + dst.shape[2:])
            view[:, i:i + mb, :, j:j + lb] = np.asarray(src).reshape(
                (dm, mb, dl, lb) + dst.shape[2:])
      pending = current
    value, threshold, stop = (
        a if a is None else jax.device_put(a[0, :num_l] if squeeze else a[:m, :num_l])
        for a in (value, threshold, stop))
  # Host arrays are cut before they go to the device (no eager device ops).
  host = lambda a: jax.device_put(a[0] if squeeze else a)
  return Policy(threshold=threshold, value=value, lam=host(lam_m), loss=host(prep.loss),
                cost=host(prep.cost), recall=recall, stop=stop,
                grid=host(prep.grid) if recall else None)
