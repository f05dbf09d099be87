"""Research options of the model fit, measured not to help, fenced off from the core.

Each was a lever of the decision-quality work (experiments/reports/QUALITY.md
and the scripts named below). None beat the core `jexit.fit` held out, so none
is a default or a command-line flag; they stay tested and usable here:

- `history=alpha`: transitions conditioned on the best loss so far as well as
  the bin, `trans [K-1, X, S, S]`, shrunk towards the Markov rows with alpha
  pseudo-rows (recall only; experiments/history.py).
- `trans_model="parametric"`: the Markov rows as a heteroscedastic ordered
  probit fitted by maximum likelihood with optax (experiments/parametric.py).
- `quantile_power=p`: finer quantile bins at one end of the signal
  (experiments/binning.py).
- `prior="marginal"`, `kernel=w`: transition pseudo-counts in proportion to
  the next ramp's bin law; a Gaussian blur of the counts across bins
  (experiments/quality.py's "default+kernel").
- `tilted(factors)`: extra candidate policies solved with one ramp's cost
  scaled (experiments/cost_tilts.py).

`fit` takes every core `jexit.fit` option too; `candidates(...)` and
`tilted(...)` plug into `jexit.protocol.frontier(..., candidates=...)`.
"""

import functools
import importlib
import math
from statistics import NormalDist
from typing import Optional, Sequence, Tuple

import numpy as np

from jexit.types import Binning, ExitModel, Traces, is_real_scalar

# `jexit.fit` is the function; the module is `core` here.
core = importlib.import_module("jexit.fit")
PARAMETRIC_STEPS = 1000  # Adam steps of the parametric transition fit


def loss_grid(loss):
  """The solver's distinct-loss grid (imported here: the core must not need JAX)."""
  from jexit.solver import loss_grid as grid  # pylint: disable=import-outside-toplevel
  return grid(loss)


def _smooth_counts(counts: np.ndarray, width: float) -> np.ndarray:
  """Counts `[S, S]` blurred with a Gaussian kernel of `width` bins on both axes."""
  if width <= 0:
    return counts
  idx = np.arange(counts.shape[0])
  kernel = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / width) ** 2)
  kernel /= kernel.sum(axis=1, keepdims=True)
  return kernel @ counts @ kernel.T


def _check(history, trans_model, trans_strength, prior, kernel):
  core._check_nonnegative("kernel", kernel, "width")
  if prior not in ("uniform", "marginal"):
    raise ValueError(f"prior: expected 'uniform' or 'marginal', got {prior!r}")
  if history is not None and (not is_real_scalar(history) or not np.isfinite(history)
                              or history < 0):
    raise ValueError(f"history: expected None or a finite shrinkage strength alpha >= 0 "
                     f"(pseudo-rows), got {history!r}")
  if trans_model not in ("counts", "parametric"):
    raise ValueError(f"trans_model: expected 'counts' or 'parametric', got {trans_model!r}")
  if trans_strength is not None:
    if trans_model != "parametric":
      raise ValueError(f"trans_strength: expected None with trans_model={trans_model!r} "
                       f"(it weighs the parametric rows), got {trans_strength!r}")
    if not is_real_scalar(trans_strength) or np.isnan(trans_strength) or trans_strength < 0:
      raise ValueError(f"trans_strength: expected None or a number of pseudo-rows >= 0 "
                       f"(inf allowed), got {trans_strength!r}")


def fit(traces: Traces, *,
        quantile_power: float = 1.0,
        prior: str = "uniform",
        kernel: float = 0.0,
        history: Optional[float] = None,
        trans_model: str = "counts",
        trans_strength: Optional[float] = None,
        **options) -> Tuple[ExitModel, Binning]:
  """`jexit.fit` with the research options; every other keyword is `jexit.fit`'s.

  Args:
    traces: the traces.
    quantile_power: p for `bins="quantile"`: inner edge i at the quantile
      level `(i / S) ** p` of the ramp's fit rows (`jexit.fit.quantile_edges`).
      1: bins of equal counts (the core); p > 1: finer bins among the most
      confident inputs, where the stop thresholds of tight loss budgets sit;
      p < 1: finer among the least confident.
    prior: where the transition pseudo-counts go: `"uniform"` (the core: the
      same in every cell) or `"marginal"` (in proportion to the next ramp's
      bin law, itself smoothed so no cell is zero).
    kernel: width in bins of a Gaussian blur of the transition counts (0:
      none); neighbouring bins share their rows' evidence.
    history: None: the Markov `trans [K-1, S, S]`. A number alpha >= 0: the
      state-conditioned `trans [K-1, X, S, S]` (recall only), where x is the
      recall state after ramp k, the index in the solver's grid X (the sorted
      distinct values of `loss` in `jexit.solver.working_dtype()`) of
      `min_{j <= k} loss[j, bin_j]`. From the counts `n[k, x, a, b]` of the
      fit rows, each row is shrunk towards the Markov row with alpha
      pseudo-rows:

        trans[k, x, a, :] = (n[k, x, a, :] + alpha * markov[k, a, :])
                            / (sum_b n[k, x, a, b] + alpha)

      alpha -> inf gives the Markov model; alpha = 0 the empirical
      conditional frequencies (the Markov row where `(k, x, a)` has no data).
      Solve it in the same x64 mode it was fitted in (X depends on the
      dtype). Its stop sets need not be down-sets in x; the solver's threshold
      table then keeps the stop prefix (conservative).
    trans_model: `"counts"` (the core) or `"parametric"`: a heteroscedastic
      ordered-probit model, 2 + (S - 1) parameters per ramp transition, fitted
      by maximum likelihood (Adam, `optax`) to the counts `n[k, a, b]`. Bin a
      of ramp k sits at `z_a = Phi^{-1}(q_a)`, `q_a` the mid quantile of bin a
      among the fit rows at ramp k (half a pseudo-count per bin keeps `q_a` in
      (0, 1)); ramp k+1's latent value is `N(beta_k * z_a, exp(delta_k *
      z_a)^2)` and bin b of ramp k+1 is the interval `(t_k[b-1], t_k[b]]` of
      the latent axis, with cut points `t_k [S-1]` fitted too and the outer
      bins open-ended:

        param[k, a, b] = Phi((t_k[b] - beta_k z_a) / exp(delta_k z_a))
                         - Phi((t_k[b-1] - beta_k z_a) / exp(delta_k z_a))

    trans_strength: with `"parametric"`, how many pseudo-rows of the
      parametric row are added to each row's smoothed counts `c[k, a, :]`:

        trans[k, a, :] = (c[k, a, :] + strength * param[k, a, :])
                         / (sum_b c[k, a, b] + strength)

      None (or inf): the parametric rows alone; 0: the counts model exactly.
    **options: `jexit.fit`'s keyword arguments (rows, bins, num_bins, ...).

  Returns:
    `(model, binning)` as `jexit.fit`, with `trans [K-1, X, S, S]` when
    `history` is given.

  Examples:
    >>> import numpy as np, jexit
    >>> from jexit import contrib
    >>> rng = np.random.default_rng(0)
    >>> t = jexit.Traces(rng.uniform(size=(100, 3)), rng.integers(0, 3, (100, 3)), None,
    ...                  np.ones(3))
    >>> conditioned, _ = contrib.fit(t, history=32.0)  # trans [K-1, X, S, S]
    >>> conditioned.trans.shape[::2]
    (2, 32)
    >>> probit, _ = contrib.fit(t, trans_model="parametric", trans_strength=16.0)
    >>> bool(np.allclose(probit.trans.sum(-1), 1.0))
    True
  """
  _check(history, trans_model, trans_strength, prior, kernel)
  options = dict(options)
  traces = core.fit_rows(traces, options.pop("rows", None))
  binning, values = core.fit_binning(
      traces, quantile_power=quantile_power,
      **{k: options[k] for k in ("bins", "step", "num_bins", "signal", "signal_range",
                                 "class_block") if k in options})
  # The core fit on these edges: the same signal, init and losses.
  model, binning = core.fit(traces, **{**options, "bins": binning.edges})
  b = binning.assign(values)
  s_count = binning.num_bins
  smoothing = options.get("smoothing", 1.0)
  trans = model.trans
  if prior != "uniform" or kernel > 0 or trans_model != "counts":
    trans = _variant_trans(b, s_count, smoothing, prior, kernel, trans_model, trans_strength)
  if history is not None:
    trans = _conditioned_trans(b, model.loss, trans, float(history))
  return model._replace(trans=trans), binning


def _variant_trans(b, s_count, smoothing, prior, kernel, trans_model, trans_strength):
  """`[K-1, S, S]` Markov rows with the research options (see `fit`)."""
  k = b.shape[1]
  counts_all = core.transition_counts(b, s_count)
  trans = np.empty((max(k - 1, 0), s_count, s_count))
  strength = math.inf if trans_strength is None else float(trans_strength)
  if trans_model == "parametric" and k > 1 and strength > 0:
    param, _ = _parametric_trans(b, s_count)
  for r in range(k - 1):
    counts = _smooth_counts(counts_all[r], kernel)
    if prior == "uniform":
      counts = counts + smoothing
    else:
      # Shrink each row towards the next ramp's marginal law (itself smoothed so
      # that no cell is zero): sparse rows borrow the typical next bin, not a
      # uniform one that would put mass on bins the data never visits.
      marginal = np.bincount(b[:, r + 1], minlength=s_count) + 1.0 / s_count
      counts = counts + smoothing * s_count * marginal / marginal.sum()
    if trans_model == "parametric" and strength > 0:
      if math.isinf(strength):
        trans[r] = param[r]
        continue
      counts = counts + strength * param[r]
    trans[r] = core.row_laws(counts)
  return trans


def candidates(**research):
  """A `jexit.protocol.frontier(..., candidates=)` function fitting each
  candidate model with `fit(..., **research)` (one per `num_bins` value); its
  `.markov` fits the same without `history`, for the no-recall grid."""
  from jexit.protocol import fit_candidates  # pylint: disable=import-outside-toplevel
  markov = {k: v for k, v in research.items() if k != "history"}

  def make(traces, rows, options):
    return fit_candidates(traces, rows, options, fit_fn=functools.partial(fit, **research))

  make.markov = lambda traces, rows, options: fit_candidates(
      traces, rows, options, fit_fn=functools.partial(fit, **markov))
  return make


def tilted(factors: Sequence[float], base=None):
  """A `candidates` function that adds, to each candidate model of `base`
  (default `jexit.protocol.fit_candidates`), the same model with one ramp's
  cost (one ramp at a time, the last excepted) multiplied by each factor: more
  Bellman-optimal policies (optimal for a reweighted objective) to choose
  from on the fit rows, at `1 + len(factors) * (K - 1)` times the policies."""
  from jexit.protocol import fit_candidates  # pylint: disable=import-outside-toplevel
  base = fit_candidates if base is None else base

  def make(traces, rows, options):
    out = []
    for model, binning in base(traces, rows, options):
      out.append((model, binning))
      for ramp in range(len(model.cost) - 1):
        for f in factors:
          cost = np.array(model.cost, np.float64)
          cost[ramp] *= f
          out.append((model._replace(cost=cost), binning))
    return out

  return make


def _conditioned_trans(b: np.ndarray, loss: np.ndarray, markov: np.ndarray,
                       alpha: float) -> np.ndarray:
  """`[K-1, X, S, S]` transitions given the recall state, shrunk to `markov`.

  Args:
    b: `[N, K]` bins of the fit rows. loss: `[K, S]` the model's loss table.
    markov: `[K-1, S, S]` the Markov rows to shrink towards. alpha: pseudo-rows.
  """
  # The grid exactly as the solver builds it: distinct losses in the working
  # dtype (float32 merges values that differ only in float64).
  grid, idx = loss_grid(loss)  # [X], [K, S]
  n, k = b.shape
  s_count = loss.shape[1]
  # The grid is sorted, so the index of the best loss so far is the running
  # min of the indices.
  x = np.minimum.accumulate(idx[np.arange(k)[None, :], b], axis=1)  # [N, K]
  counts = np.zeros((k - 1, len(grid), s_count, s_count))
  ramp = np.broadcast_to(np.arange(k - 1)[None, :], (n, k - 1))
  np.add.at(counts, (ramp, x[:, :-1], b[:, :-1], b[:, 1:]), 1.0)
  prior = markov[:, None, :, :]
  rows = counts.sum(-1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    shrunk = (counts + alpha * prior) / (rows + alpha)
  # alpha = 0 and no data in (k, x, a): nothing to condition on, keep Markov.
  return np.where(rows + alpha > 0, shrunk, np.broadcast_to(prior, shrunk.shape))


def _latent_axis(counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Bins of one ramp on a standard normal axis, from their counts `[S]`.

  Returns `(mid [S], cuts [S-1])`: `Phi^{-1}` of each bin's mid quantile and
  of the quantiles between bins. Half a pseudo-count per bin keeps every
  quantile inside (0, 1) and every bin a proper interval.
  """
  w = np.asarray(counts, np.float64) + 0.5
  upper = np.cumsum(w) / w.sum()
  lower = upper - w / w.sum()
  inv = np.vectorize(NormalDist().inv_cdf, otypes=[np.float64])
  return inv((lower + upper) / 2), inv(np.clip(upper[:-1], 1e-12, 1 - 1e-12))


def _parametric_trans(b: np.ndarray, s_count: int,
                      steps: int = PARAMETRIC_STEPS) -> Tuple[np.ndarray, dict]:
  """`[K-1, S, S]` ordered-probit transitions fitted to the bins `b [N, K]`.

  See `fit(trans_model="parametric")`. Returns `(trans, params)`, `params`
  the fitted `beta [K-1]`, `delta [K-1]`, `cuts [K-1, S-1]` and the axes
  `z [K-1, S]` they were fitted on.
  """
  n, k = b.shape
  counts = np.zeros((k - 1, s_count, s_count))
  ramp = np.broadcast_to(np.arange(k - 1)[None, :], (n, k - 1))
  np.add.at(counts, (ramp, b[:, :-1], b[:, 1:]), 1.0)
  if s_count == 1:
    return np.ones((k - 1, 1, 1)), {}
  axes = [_latent_axis(np.bincount(b[:, r], minlength=s_count)) for r in range(k)]
  z = np.stack([axes[r][0] for r in range(k - 1)])  # [K-1, S] source ramps
  cuts = np.stack([axes[r + 1][1] for r in range(k - 1)])  # [K-1, S-1] start
  # Start at the independent model (beta = delta = 0: every row is the next
  # ramp's marginal), cut points parametrised by the first one and softplus gaps.
  gaps = np.maximum(np.diff(cuts, axis=1), 1e-6)
  start = {"beta": np.zeros(k - 1), "delta": np.zeros(k - 1), "first": cuts[:, 0],
           "gaps": np.log(np.expm1(gaps))}
  fitted, probs = _probit_fitter(steps)(start, counts, z)
  params = {name: np.asarray(v, np.float64) for name, v in fitted.items()}
  params["cuts"] = params.pop("first")[:, None] + np.concatenate(
      [np.zeros((k - 1, 1)), np.cumsum(np.logaddexp(0.0, params.pop("gaps")), axis=1)], axis=1)
  params["z"] = z
  trans = np.maximum(np.asarray(probs, np.float64), 0.0)
  return trans / trans.sum(-1, keepdims=True), params


@functools.lru_cache(maxsize=None)
def _probit_fitter(steps: int):
  """A jitted `(start, counts [T, S, S], z [T, S]) -> (params, probs [T, S, S])`."""
  # Imported here: `import jexit` (and the numpy runtime) must not need JAX.
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.scipy.special import ndtr  # pylint: disable=import-outside-toplevel

  def probs(p, z):  # one ramp transition: z [S] -> [S, S]
    cuts = p["first"] + jnp.concatenate([jnp.zeros(1), jnp.cumsum(jax.nn.softplus(p["gaps"]))])
    x = (cuts[None, :] - p["beta"] * z[:, None]) * jnp.exp(-p["delta"] * z)[:, None]
    ones, zeros = jnp.ones_like(x[:, :1]), jnp.zeros_like(x[:, :1])
    below = jnp.concatenate([zeros, ndtr(x), ones], axis=1)
    above = jnp.concatenate([ones, ndtr(-x), zeros], axis=1)
    # Difference of the smaller tail: 1 - Phi(x) for x > 0 cancels in float32.
    lower = jnp.concatenate([-ones, x], axis=1)
    return jnp.where(lower > 0, above[:, :-1] - above[:, 1:], below[:, 1:] - below[:, :-1])

  def nll(p, counts, z):  # mean negative log-likelihood per row of one transition
    logp = jnp.log(jnp.maximum(probs(p, z), 1e-30))
    return -jnp.sum(jnp.where(counts > 0, counts * logp, 0.0)) / jnp.maximum(counts.sum(), 1.0)

  total = lambda p, counts, z: jnp.sum(jax.vmap(nll)(p, counts, z))
  # The transitions are independent: one summed loss, one Adam state; each
  # parameter's gradient comes from its own transition only.
  opt = optax.adam(optax.cosine_decay_schedule(0.05, steps, alpha=0.01))

  @jax.jit
  def run(start, counts, z):
    p = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), start)
    counts, z = jnp.asarray(counts, jnp.float32), jnp.asarray(z, jnp.float32)
    grad = jax.grad(total)

    def step(carry, _):
      p, state = carry
      updates, state = opt.update(grad(p, counts, z), state, p)
      return (optax.apply_updates(p, updates), state), None

    (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
    return p, jax.vmap(probs)(p, z)

  return run
