"""Replays exit policies on traces, as a deployed model acts, and scores them.

`evaluate` replays every table policy of a batch `[..., L]` on every input of a
trace (PROBLEM.md, "Metrics"); `expected_objective` is the same policy's
expected objective under an `ExitModel` (a forward pass over the Markov chain),
so model value and trace value can be compared. The `Evaluation` and its
metrics, shared with the baselines, are `jexit.metrics`'.
"""

import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jexit.metrics import _PER_POLICY, Evaluation, from_counts
from jexit.solver import PRECISION, check_model, loss_grid, working_dtype
from jexit.traces import check_traces, signal_values
from jexit.types import Binning, ExitModel, Policy, Traces, check_policy, is_real_scalar

_mm = functools.partial(jnp.matmul, precision=PRECISION)

DEFAULT_MAX_BYTES = 1 << 30  # working memory of one chunk of the policy batch
_ROW_PAD = 128  # paths are padded to a multiple of this, so calls share a compile


def _monotone(threshold: np.ndarray, lam: np.ndarray):
  """Per model, the lam order `[M, L]` and the thresholds sorted by it, if every
  threshold is nondecreasing along it (what `solve` returns for a lam grid:
  a larger lam never makes stopping less attractive); else None."""
  order = np.argsort(lam, axis=1, kind="stable")
  thr = np.take_along_axis(threshold, order[:, :, None, None], axis=1)
  if np.all(thr[:, 1:] >= thr[:, :-1]):  # +-inf compare as themselves
    return order, thr
  return None


def _sweep_counts(thr, bins, best, best_ramp, loss_in, agree_w, correct_w, weight):
  """One model's `[L]` policies, thresholds nondecreasing along L, by intervals.

  With monotone thresholds the stop decision of path u at ramp k holds for
  every policy from `first[u, k]` on (a binary search in the column
  `thr[:, k, bin]`), so the path stops at ramp k exactly for the policies in
  `[first[u, k], min_{j<k} first[u, j])`. Each path adds its counts to at
  most K such intervals (difference arrays), so the cost is O(U K log L + L K)
  instead of the replay's O(U K L). Same decisions as `_replay_one`.

  Returns:
    stop_count, out_count `[L, K]`; agree_count, correct_count, loss_sum `[L]`.
  """
  num_lam, k, s = thr.shape
  u = bins.shape[0]
  first = np.zeros((u, k), np.int64)  # the last ramp always stops: 0
  for r in range(k - 1):
    order = np.argsort(bins[:, r], kind="stable")
    bounds = np.searchsorted(bins[order, r], np.arange(s + 1))
    for b in np.flatnonzero(bounds[1:] > bounds[:-1]):
      rows = order[bounds[b]:bounds[b + 1]]
      first[rows, r] = np.searchsorted(thr[:, r, b], best[rows, r], side="left")
  before = np.concatenate([np.full((u, 1), num_lam), np.minimum.accumulate(first, axis=1)[:, :-1]],
                          axis=1)
  uu, kk = np.nonzero(first < before)
  start, end = first[uu, kk], before[uu, kk]
  out = best_ramp[uu, kk]
  w = weight[uu].astype(np.float64)

  def tally(col, values, width):
    size = (num_lam + 1) * width
    diff = (np.bincount(start * width + col, values, minlength=size)
            - np.bincount(end * width + col, values, minlength=size))
    return np.cumsum(diff.reshape(num_lam + 1, width), axis=0)[:num_lam]

  zero = np.zeros_like(uu)
  count = lambda col, values, width: np.rint(tally(col, values, width)).astype(np.int64)
  return (count(kk, w, k), count(out, w, k), count(zero, agree_w[uu, out], 1)[:, 0],
          count(zero, correct_w[uu, out], 1)[:, 0],
          tally(zero, loss_in[uu, out].astype(np.float64) * w, 1)[:, 0])


def _replay_one(threshold, m, bins, best, best_ramp, loss_w, agree_w, correct_w, weight):
  """One policy on every distinct input path, as the deployed model acts.

  At ramp k a path is in bin `b = bins[u, k]`; it stops iff
  `best[u, k] <= threshold[k, b]` (best loss so far with recall, the current
  loss without), and always at the last ramp. The output is
  `best_ramp[u, stop]`: the ramp that achieved the best loss (recall; latest
  on ties), or the stopping ramp itself (no recall: `best_ramp[u, k] = k`).

  Args:
    threshold: `[K, S]`. m: model index into the `[M, ...]` arrays.
    bins, best, best_ramp: `[M, U, K]` per path: bin, best loss so far and
      the ramp that achieved it. loss_w: `[M, U, K]` loss times `weight`.
    agree_w, correct_w: `[U, K]` int, how many of the path's inputs have
      ramp k agreeing with the final ramp / with the label.
    weight: `[U]` int, how many inputs follow the path (0 on padding).

  Returns:
    Inputs per stop ramp and per output ramp `[K]`; agreeing and correct
    outputs and the loss paid, summed over inputs; the per-path stop and
    output ramps `[U]`.
  """
  b = bins[m]
  num_ramps = b.shape[1]
  ks = jnp.arange(num_ramps)
  t = threshold[ks[None, :], b]  # [U, K]: the table lookup of every step
  stop = (best[m] <= t).at[:, -1].set(True)
  stop_ramp = jnp.argmax(stop, axis=1).astype(jnp.int32)  # the first stop
  out = jnp.take_along_axis(best_ramp[m], stop_ramp[:, None], axis=1)[:, 0]
  at_out = lambda a: jnp.take_along_axis(a, out[:, None], axis=1)[:, 0].sum()
  hist = lambda r: jnp.zeros(num_ramps, weight.dtype).at[r].add(weight)
  return (hist(stop_ramp), hist(out), at_out(agree_w), at_out(correct_w), at_out(loss_w[m]),
          stop_ramp, out)


@functools.partial(jax.jit, static_argnames=("per_input",))
def _replay_batch(threshold, model_idx, bins, best, best_ramp, loss_w, agree_w, correct_w,
                  weight, *, per_input):
  """`[P]` policies on every path: vmap of `_replay_one` (the one jit).

  Recall and no-recall share the compile: they differ only in the data
  (`best`, `best_ramp`).
  """
  out = jax.vmap(_replay_one, in_axes=(0, 0) + (None,) * 7)(
      threshold, model_idx, bins, best, best_ramp, loss_w, agree_w, correct_w, weight)
  return out if per_input else out[:5]


def _replay_chunks(thr_flat, num_lam, m, path_arrays, max_bytes, *, per_policy, per_input):
  """`_replay_batch` over the flat `[M * L]` policy batch, in chunks under `max_bytes`."""
  total = thr_flat.shape[0]
  model_idx = np.repeat(np.arange(m, dtype=np.int32), num_lam)
  limit = max(1, max_bytes // per_policy)
  # Power-of-two chunks: a new batch size of the same order reuses the compile.
  chunk = min(1 << int(limit).bit_length() - 1, 1 << (total - 1).bit_length())
  device_args = tuple(jax.device_put(a) for a in path_arrays)
  parts = []
  for start in range(0, total, chunk):
    idx = np.arange(start, start + chunk)
    idx = np.where(idx < total, idx, 0)  # pad the last chunk with policy 0
    res = _replay_batch(thr_flat[idx], model_idx[idx],
                        *device_args, per_input=per_input)
    take = min(chunk, total - start)
    parts.append([np.asarray(r)[:take] for r in res])
  return [np.concatenate(col) for col in zip(*parts)]


def _policy_arrays(policy: Policy):
  policy = check_policy(policy)
  return policy.threshold, policy.loss, policy.lam


def _model_edges(binning, m: int, k: int, s: int):
  """`[M, K, S+1]` edges: one binning for all models, or one per model."""
  if isinstance(binning, Binning):
    edges = np.asarray(binning.edges)
    signal, calibration = binning.signal, binning.calibration
  elif isinstance(binning, (list, tuple)) and all(isinstance(b, Binning) for b in binning):
    same = lambda a, b: (a is None and b is None) or (
        a is not None and b is not None and np.array_equal(a, b))
    if len({b.signal for b in binning}) > 1 or not all(
        same(b.calibration, binning[0].calibration) for b in binning):
      raise ValueError("binning: every model's binning must bin the same signal "
                       "(and, for 'class', with the same calibration)")
    edges = np.stack([np.asarray(b.edges) for b in binning])
    signal, calibration = binning[0].signal, binning[0].calibration
  else:
    raise ValueError(f"binning: expected jexit.Binning or a list of them, got "
                     f"{type(binning).__name__}")
  if edges.dtype.kind not in "iuf":
    raise ValueError(f"binning.edges: expected real numbers, got dtype {edges.dtype}")
  edges = edges.astype(np.float64)
  # NaN or unsorted edges would bin every input somewhere, silently.
  if not np.all(np.isfinite(edges)) or np.any(np.diff(edges, axis=-1) <= 0):
    raise ValueError("binning.edges: expected finite, strictly increasing edges per ramp")
  if edges.ndim == 2:
    edges = np.broadcast_to(edges, (m,) + edges.shape)
  if edges.shape != (m, k, s + 1):
    raise ValueError(f"binning.edges: expected shape [K={k}, S+1={s + 1}] (or one per "
                     f"model, [M={m}, K, S+1]), got {edges.shape}")
  return edges, signal, calibration


def evaluate(policy: Policy, traces: Traces,
             binning: Union[Binning, Sequence[Binning]], *,
             max_bytes: int = DEFAULT_MAX_BYTES,
             return_per_input: bool = False, method: str = "auto") -> Evaluation:
  """Replays every policy of a batch on every input of a trace and scores it.

  Per input and policy, exactly as a deployed model acts: bin each ramp's
  signal, look up `x` (best loss so far with recall, current loss without)
  and stop at the first ramp k with `x <= threshold[k, bin_k]` (always at the
  last ramp); output the ramp that achieved the best loss (latest on ties) or
  the stopping ramp. Inputs whose bins agree at every ramp take the same
  decisions, so each distinct bin path is scored once and weighted by its
  inputs. A lam grid from `solve` (thresholds nondecreasing in lam) is scored
  by an interval sweep on the host: each path stops at ramp k for a contiguous
  range of lam. Any other batch is replayed by one jitted vmap over policies
  (chunked so that a chunk's working memory stays under `max_bytes`). Metrics
  are computed on the host in float64 from integer counts.

  Args:
    policy: a `Policy` with `threshold [..., L, K, S]`, `loss [..., K, S]`.
    traces: `N` inputs with `K` ramps.
    binning: the `Binning` the policy's model was fitted with (edges
      `[K, S+1]`), or a list of M of them for a model batch.
    max_bytes: memory budget of one chunk of the policy batch.
    return_per_input: also return `stop_ramp`, `output_ramp` `[..., L, N]`.
    method: `"auto"` (default) uses the interval sweep when every model's
      thresholds are nondecreasing in lam (as `solve` returns them) and no
      per-input result is asked for, else the replay; `"replay"` always
      replays (one jitted vmap over policies); `"sweep"` requires the sweep.
      Both give the same decisions and counts; the sweep costs
      O(paths x K x log L) on the host instead of O(paths x K x L).

  Returns:
    An `Evaluation` with `param = lam [..., L]` and the objective at each lam
    (mean of the policy's loss of the output ramp + lam * cost).

  Examples:
    >>> import numpy as np, jexit
    >>> from jexit.evaluation import evaluate
    >>> rng = np.random.default_rng(0)
    >>> t = jexit.Traces(rng.uniform(size=(200, 3)), rng.integers(0, 2, (200, 3)),
    ...                  None, np.ones(3))
    >>> model, binning = jexit.fit(t)
    >>> ev = evaluate(jexit.solve(model, np.array([1e-3, 0.1])), t, binning)
    >>> ev.agreement.shape, ev.stop_hist.shape
    ((2,), (2, 3))
  """
  traces = check_traces(traces)
  threshold, loss, lam = _policy_arrays(policy)
  n, k = traces.conf.shape
  batched = threshold.ndim == 4
  if not batched:
    threshold, loss, lam = threshold[None], loss[None], lam[None]
  m, num_lam, k_policy, s = threshold.shape
  if k_policy != k:
    raise ValueError(f"policy.threshold: expected K={k} ramps like the traces, got "
                     f"shape {np.asarray(policy.threshold).shape}")
  if not (is_real_scalar(max_bytes) and max_bytes > 0):
    raise ValueError(f"max_bytes: expected a positive budget, got {max_bytes!r}")
  if method not in ("auto", "replay", "sweep"):
    raise ValueError(f"method: expected 'auto', 'replay' or 'sweep', got {method!r}")
  edges, signal_name, calibration = _model_edges(binning, m, k, s)
  values = signal_values(traces, signal_name, "binning.signal", calibration)

  bins_n = np.stack([Binning(edges[i]).assign(values) for i in range(m)])
  # Inputs whose bins agree at every ramp (under every model) take the same
  # decisions: replay each distinct path once, weighted by how many inputs
  # follow it. Exact, and for large N it bounds the work by the paths seen.
  keys = bins_n.transpose(1, 0, 2).reshape(n, m * k)
  uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
  inverse = inverse.reshape(n)
  u = len(uniq)
  u_pad = -(-u // _ROW_PAD) * _ROW_PAD
  bins = np.zeros((m, u_pad, k), np.int32)
  bins[:, :u] = uniq.reshape(u, m, k).transpose(1, 0, 2)
  weight = np.bincount(inverse, minlength=u_pad).astype(np.int32)
  group = lambda a: np.stack([np.bincount(inverse, weights=a[:, r], minlength=u_pad)
                              for r in range(k)], axis=1).round().astype(np.int32)
  agree_w = group(traces.pred == traces.pred[:, -1:])
  correct_w = (group(traces.pred == traces.label[:, None]) if traces.label is not None
               else np.zeros((u_pad, k), np.int32))

  # Per model, the losses and the best-so-far are the same for every lam:
  # compute them once on the host, in the policy's own dtype, so the
  # comparison with thresholds (members of `loss`) is exact.
  loss_in = np.stack([loss[i][np.arange(k)[None, :], bins[i]] for i in range(m)])
  if policy.recall:
    best = np.minimum.accumulate(loss_in, axis=2)
    best_ramp = np.zeros((m, u_pad, k), np.int32)
    for r in range(1, k):
      # `<=`: the latest ramp wins a tie for the best loss (PROBLEM.md).
      best_ramp[:, :, r] = np.where(loss_in[:, :, r] <= best[:, :, r - 1], r,
                                    best_ramp[:, :, r - 1])
  else:
    best = loss_in
    best_ramp = np.broadcast_to(np.arange(k, dtype=np.int32), (m, u_pad, k))
  loss_w = loss_in * weight[None, :, None].astype(loss_in.dtype)

  total = m * num_lam
  monotone = None if method == "replay" or return_per_input else _monotone(threshold, lam)
  if method == "sweep" and monotone is None:
    raise ValueError("method: 'sweep' needs thresholds nondecreasing in lam for every "
                     "model and return_per_input=False; use 'auto' or 'replay'")
  if monotone is not None:
    order, thr_sorted = monotone
    res = [np.empty((m, num_lam) + shape, dtype) for shape, dtype in
           (((k,), np.int64), ((k,), np.int64), ((), np.int64), ((), np.int64),
            ((), np.float64))]
    for i in range(m):
      counts = _sweep_counts(thr_sorted[i], bins[i, :u], best[i, :u], best_ramp[i, :u],
                             loss_in[i, :u], agree_w[:u], correct_w[:u], weight[:u])
      for r, c in zip(res, counts):
        r[i, order[i]] = c
    res = [r.reshape((total,) + r.shape[2:]) for r in res]
  else:
    res = _replay_chunks(threshold.reshape(total, k, s), num_lam, m, (
        bins, best, best_ramp, loss_w, agree_w, correct_w, weight), max_bytes,
        per_policy=u_pad * k * (loss.itemsize + 8) + u_pad * 32, per_input=return_per_input)
  stop_count, out_count, agree_count, correct_count, loss_sum = res[:5]

  cost = traces.cost
  shape = (m, num_lam)
  lam64 = lam.astype(np.float64).reshape(total)
  mean_cost = stop_count.astype(np.float64) @ np.cumsum(cost) / n
  objective = loss_sum.astype(np.float64) / n + lam64 * mean_cost
  per_input = {}
  if return_per_input:
    per_input = dict(stop_ramp=res[5][:, inverse].reshape(shape + (n,)),
                     output_ramp=res[6][:, inverse].reshape(shape + (n,)))
  ev = from_counts(
      lam64, stop_count, out_count, agree_count,
      None if traces.label is None else correct_count, cost, n,
      objective=objective)
  ev = ev._replace(**{f: getattr(ev, f).reshape(shape + getattr(ev, f).shape[1:])
                      for f in _PER_POLICY if getattr(ev, f) is not None}, **per_input)
  if not batched:
    ev = ev._replace(**{f: getattr(ev, f)[0] for f in _PER_POLICY
                        if getattr(ev, f) is not None})
  return ev


def _grid_and_index(loss: np.ndarray):
  """`[M, X]` sorted distinct losses (padded with the largest), `[M, K, S]` indices."""
  grids, idx = zip(*(loss_grid(loss[i], loss.dtype) for i in range(loss.shape[0])))
  x = max(len(g) for g in grids)
  grid = np.stack([np.pad(g, (0, x - len(g)), mode="edge") for g in grids])
  return grid, np.stack(idx)


def _expect_recall(grid, idx, init, trans, cost, threshold, lam, *, conditioned):
  """Forward pass of a recall policy over the chain on states (x, s).

  `p_k[x, s]` is the probability of reaching ramp k with best loss `grid[x]`
  in bin s. Stopped mass pays `grid[x]`; continuing mass pays `lam c_{k+1}`
  and moves to `(min(x, idx_{k+1}(b)), b)` with probability `trans_k[s, b]`
  (or `trans_k[x, s, b]` when state-conditioned).

  Returns:
    `(objective, expected loss, expected cost, stop probability per ramp [K])`.
  """
  num_x, num_s = grid.shape[0], init.shape[0]
  xs = jnp.arange(num_x)[:, None]
  ss = jnp.arange(num_s)
  p = jnp.zeros((num_x, num_s), init.dtype).at[idx[0], ss].add(init)

  def step(carry, inputs):
    p, loss_acc, cost_acc = carry
    thr_k, trans_k, idx_next, cost_next = inputs
    stopped = jnp.where(grid[:, None] <= thr_k[None, :], p, 0)
    cont = p - stopped
    q = (jnp.einsum("xs,xsb->xb", cont, trans_k, precision=PRECISION) if conditioned
         else _mm(cont, trans_k))
    # Mass from every x >= idx_next(b) lands on x' = idx_next(b); x < idx keeps x.
    tail = jnp.cumsum(q[::-1], axis=0)[::-1]
    p_next = (jnp.where(xs < idx_next[None, :], q, 0)
              + jnp.where(xs == idx_next[None, :], tail[idx_next, ss][None, :], 0))
    carry = (p_next, loss_acc + (stopped * grid[:, None]).sum(),
             cost_acc + cost_next * cont.sum())
    return carry, stopped.sum()

  zero = jnp.zeros((), init.dtype)
  (p, loss_acc, cost_acc), stops = jax.lax.scan(
      step, (p, zero, zero), (threshold[:-1], trans, idx[1:], cost[1:]))
  loss_acc = loss_acc + (p * grid[:, None]).sum()
  mean_cost = cost[0] + cost_acc
  return loss_acc + lam * mean_cost, loss_acc, mean_cost, jnp.append(stops, p.sum())


def _expect_norecall(loss, init, trans, cost, threshold, lam):
  """Forward pass of a no-recall policy over the chain on bins s (see above)."""
  def step(carry, inputs):
    p, loss_acc, cost_acc = carry
    thr_k, loss_k, trans_k, cost_next = inputs
    stopped = jnp.where(loss_k <= thr_k, p, 0)
    cont = p - stopped
    return (_mm(cont, trans_k), loss_acc + _mm(stopped, loss_k),
            cost_acc + cost_next * cont.sum()), stopped.sum()

  zero = jnp.zeros((), init.dtype)
  (p, loss_acc, cost_acc), stops = jax.lax.scan(
      step, (init, zero, zero), (threshold[:-1], loss[:-1], trans, cost[1:]))
  loss_acc = loss_acc + _mm(p, loss[-1])
  mean_cost = cost[0] + cost_acc
  return loss_acc + lam * mean_cost, loss_acc, mean_cost, jnp.append(stops, p.sum())


@functools.partial(jax.jit, static_argnames=("recall", "conditioned"))
def _expect_batched(grid, idx, loss, init, trans, cost, threshold, lam, *, recall,
                    conditioned):
  """`[M]` models x `[L]` policies of `_expect_recall` / `_expect_norecall`."""
  if recall:
    one = functools.partial(_expect_recall, conditioned=conditioned)
    over_lam = jax.vmap(one, in_axes=(None, None, None, None, None, 0, 0))
    return jax.vmap(over_lam)(grid, idx, init, trans, cost, threshold, lam)
  over_lam = jax.vmap(_expect_norecall, in_axes=(None, None, None, None, 0, 0))
  return jax.vmap(over_lam)(loss, init, trans, cost, threshold, lam)


def expected_objective(policy: Policy, model: ExitModel, *,
                       return_parts: bool = False):
  """Expected objective of any table policy under an `ExitModel`.

  A forward pass over the Markov chain (states `(x, s)` with recall, `s`
  without) that applies the policy's decisions, `x <= threshold[k, s]`:

    objective = E[loss of the output ramp] + lam * E[cost of the ramps run]

  For a policy solved on `model` it equals `Policy.value`; for another policy
  (a baseline's table, a policy solved on other data) it is that policy's
  value under this model.

  Args:
    policy: `threshold [..., L, K, S]`; `policy.loss` must be the model's loss
      table (in the policy's dtype), since the decisions compare against it.
    model: an `ExitModel` (with a leading `[M]` iff the policy has one).
    return_parts: also return the expected loss, expected cost `[..., L]` and
      the stop probability per ramp `[..., L, K]`.

  Returns:
    `objective [..., L]`, or `(objective, loss, mean_cost, stop_prob)`.

  Examples:
    >>> import numpy as np, jexit
    >>> from jexit.evaluation import expected_objective
    >>> model = jexit.ExitModel(np.full(3, 1 / 3), np.full((1, 3, 3), 1 / 3),
    ...                         np.array([[0.1, 0.5, 0.9]] * 2), np.ones(2))
    >>> policy = jexit.solve(model, np.array([0.01, 1.0]))
    >>> bool(np.allclose(expected_objective(policy, model), policy.value))
    True
  """
  threshold, loss, lam = _policy_arrays(policy)
  model = check_model(model)
  batched = threshold.ndim == 4
  if (model.init.ndim == 2) != batched:
    raise ValueError(f"model: expected {'a batch of' if batched else 'a single'} model "
                     f"like policy.threshold {threshold.shape}, got init {model.init.shape}")
  add = (lambda a: a) if batched else (lambda a: a[None])
  threshold, loss, lam = add(threshold), add(loss), add(lam)
  init, trans, mloss, cost = (add(a) for a in model)
  if mloss.shape != loss.shape:
    raise ValueError(f"model.loss: expected shape {loss.shape[1:]} like policy.loss, "
                     f"got {model.loss.shape}")
  if not np.array_equal(mloss.astype(loss.dtype), loss):
    raise ValueError("policy.loss: expected the model's loss table (the decisions "
                     "compare against it), got a different table")
  conditioned = trans.ndim == 5
  if conditioned and not policy.recall:
    raise ValueError("model.trans: a state-conditioned trans needs a recall policy")
  dtype = working_dtype()
  grid, idx = _grid_and_index(loss)
  if conditioned and trans.shape[2] != grid.shape[1]:
    raise ValueError(f"model.trans: state-conditioned axis X must equal the number of "
                     f"distinct loss values ({grid.shape[1]}), got {trans.shape[2]}")
  cast = lambda a: np.asarray(a, dtype)
  out = _expect_batched(
      grid, idx, loss, cast(init), cast(trans),
      cast(cost), threshold, cast(lam), recall=bool(policy.recall),
      conditioned=conditioned)
  out = [np.asarray(o, np.float64) for o in out]
  if not batched:
    out = [o[0] for o in out]
  return tuple(out) if return_parts else out[0]
