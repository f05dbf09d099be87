"""Plots of frontiers, if-stop tables, exit histograms and ramp placements (matplotlib,
optional).

matplotlib is imported only when a plot is drawn (`pip install jexit[plot]`),
and only its object API is used (no pyplot, no global backend change).
"""

from typing import Dict, Optional, Tuple

import numpy as np

from jexit.metrics import Evaluation
from jexit.solver import loss_grid
from jexit.subsets import evenly_spaced
from jexit.types import Binning, Policy

_STYLE = {  # method -> (colour, marker, linestyle)
    "recall": ("C3", "o", "-"), "norecall": ("C1", "s", "-"),
    "global_threshold": ("C0", "^", "-"), "apparate_greedy": ("C2", "D", "-"),
    "patience": ("C4", "v", "-"), "fixed_ramp": ("C5", "x", ":"),
    "backbone": ("k", "*", ""), "oracle": ("0.4", "", "--"),
}


def _figure(**kwargs):
  try:
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # the plot extra is optional
    raise ImportError("plots need matplotlib: pip install 'jexit[plot]'") from e
  return Figure(**kwargs)


def if_stop_tables(policy: Policy, index: int) -> Tuple[np.ndarray, np.ndarray]:
  """The stop/continue decision tables of one policy, from its threshold table.

  With recall, `table[k, x, s]` is 1 (stop) or 0 (continue) at ramp k when the
  best loss so far is `grid[x]` and the current bin is s: `grid[x] <=
  threshold[k, s]`; NaN where the state cannot occur (the best so far is at
  most the current loss, and at ramp 1 equals it). Without recall the table is
  `[K, 1, S]`: `loss[k, s] <= threshold[k, s]`, and `grid` is empty.

  Args:
    policy: a `Policy [L]` (no model batch).
    index: which lam.

  Returns:
    `(grid [X], table [K, X, S])` as float arrays.
  """
  threshold = np.asarray(policy.threshold)
  if threshold.ndim != 3:
    raise ValueError(f"policy.threshold: expected shape [L, K, S] (one model), got "
                     f"{threshold.shape}")
  if not -threshold.shape[0] <= index < threshold.shape[0]:
    raise ValueError(f"index: expected a lam index in [0, {threshold.shape[0]}), got {index}")
  thr = threshold[index]
  loss = np.asarray(policy.loss)
  if not policy.recall:
    return np.zeros(0), (loss <= thr).astype(np.float64)[:, None, :]
  grid = loss_grid(loss, loss.dtype)[0]
  table = (grid[None, :, None] <= thr[:, None, :]).astype(np.float64)  # [K, X, S]
  reachable = grid[None, :, None] <= loss[:, None, :]
  reachable[0] = grid[:, None] == loss[0][None, :]
  table[~reachable] = np.nan
  return grid, table


def plot_if_stop(policy: Policy, index: int, *, axes=None, binning: Optional[Binning] = None,
                 title: Optional[str] = None):
  """Heatmaps of the if-stop tables per ramp (the paper's Figures 4 and 6).

  Rows: the current minimum (best loss so far); columns: the current bin.
  The last ramp always stops and is not drawn.

  Returns:
    The matplotlib `Figure`.
  """
  grid, table = if_stop_tables(policy, index)
  k = table.shape[0]
  own = axes is None
  if own:
    fig = _figure(figsize=(3.2 * max(k - 1, 1), 3.0), layout="constrained")
    axes = fig.subplots(1, max(k - 1, 1), squeeze=False)[0]
  else:
    fig = axes[0].figure
  from matplotlib.colors import ListedColormap  # pylint: disable=import-outside-toplevel
  cmap = ListedColormap(["#d9d9d9", "#c0392b"]).with_extremes(bad="white")
  lam = float(np.asarray(policy.lam)[index])
  for r, ax in zip(range(k - 1), axes):
    ax.imshow(np.ma.masked_invalid(table[r]), origin="lower", aspect="auto", cmap=cmap,
              vmin=0, vmax=1, interpolation="nearest")
    s = table.shape[2]
    ticks = np.unique(np.linspace(0, s - 1, min(s, 5)).round().astype(int))
    ax.set_xticks(ticks)
    if binning is not None:
      edges = np.asarray(binning.edges)[r]
      ax.set_xticklabels([f"{edges[i]:.2g}" for i in ticks])
      ax.set_xlabel("current bin (lower edge)")
    else:
      ax.set_xlabel("current bin")
    if grid.size:
      yt = np.unique(np.linspace(0, grid.size - 1, min(grid.size, 6)).round().astype(int))
      ax.set_yticks(yt)
      ax.set_yticklabels([f"{grid[i]:.2g}" for i in yt])
      ax.set_ylabel("current minimum loss")
    else:
      ax.set_yticks([])
    ax.set_title(f"ramp {r + 1}: stop (red) / go on (grey)"
                 + ("" if own else f", lam={lam:.3g}"), fontsize=9)
  if title is None:
    title = f"if-stop tables, {'recall' if policy.recall else 'no recall'}, lam={lam:.3g}"
  if own:
    fig.suptitle(title, fontsize=10)
  return fig


def plot_frontier(test: Dict[str, Evaluation], pareto: Optional[Dict[str, np.ndarray]] = None,
                  *, ax=None, order: Optional[Dict[str, np.ndarray]] = None,
                  title: Optional[str] = None):
  """Speedup vs agreement of every method on one axes.

  Args:
    test: method -> `Evaluation [P]` (what is plotted).
    pareto: method -> `[P]` bool, which points to draw (default all).
    order: method -> `[P]` key to order the line by (default mean cost).

  Returns:
    The matplotlib `Figure`.
  """
  if ax is None:
    fig = _figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
  for m, ev in test.items():
    keep = np.ones(len(ev.agreement), bool) if pareto is None else np.asarray(pareto[m])
    idx = np.flatnonzero(keep)
    key = np.asarray(ev.mean_cost if order is None else order[m])
    idx = idx[np.argsort(key[idx], kind="stable")]
    colour, marker, ls = _STYLE.get(m, ("C7", ".", "-"))
    # jexit's own policies are drawn on top, where curves coincide.
    ax.plot(np.asarray(ev.agreement)[idx] * 100, np.asarray(ev.speedup)[idx],
            color=colour, marker=marker, linestyle=ls or "none", markersize=4,
            linewidth=1.2, label=m, zorder=3 if m == "recall" else 2)
  ax.set_xlabel("agreement with the backbone (%)")
  ax.set_ylabel("speedup (total cost / mean cost)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=10)
  return ax.figure


def plot_exit_hist(evaluations: Dict[str, Tuple[Evaluation, int]], *, ax=None,
                   title: Optional[str] = None):
  """Grouped bars of where inputs stopped (and, for recall, whose output was used).

  Args:
    evaluations: label -> `(Evaluation [P], index)`.

  Returns:
    The matplotlib `Figure`.
  """
  if ax is None:
    fig = _figure(figsize=(6.4, 3.2), layout="constrained")
    ax = fig.subplots()
  bars = []
  for name, (ev, i) in evaluations.items():
    stop = np.asarray(ev.stop_hist)[i]
    out = np.asarray(ev.output_hist)[i]
    bars.append((f"{name}: stop", stop))
    if not np.allclose(stop, out):
      bars.append((f"{name}: output", out))
  if not bars:
    return ax.figure
  k = len(bars[0][1])
  width = 0.8 / len(bars)
  for j, (label, h) in enumerate(bars):
    ax.bar(np.arange(k) + (j - (len(bars) - 1) / 2) * width, h * 100, width, label=label)
  ax.set_xticks(np.arange(k))
  ax.set_xticklabels([f"ramp {r + 1}" for r in range(k)])
  ax.set_ylabel("inputs (%)")
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=10)
  return ax.figure


def plot_sweep(fr, path, *, max_loss: float = 0.01, trace: Optional[str] = None,
               dpi: int = 120) -> str:
  """One figure for a `Frontier`: the frontiers, the if-stop tables and exit histograms.

  The if-stop tables and histograms show the recall policy (and the global
  threshold) at the parameter chosen on the fit rows for `max_loss` (or, if
  none meets it, the one with the highest fit agreement).

  Returns:
    The path written.
  """
  from jexit.protocol import candidate_policy  # pylint: disable=import-outside-toplevel
  from jexit.select import choose_index  # pylint: disable=import-outside-toplevel
  k = int(np.asarray(fr.model.cost).shape[0])
  has_policy = fr.policy is not None and "recall" in fr.test
  fig = _figure(figsize=(max(9.0, 3.2 * (k - 1)), 11.0 if has_policy else 8.0),
                layout="constrained")
  rows = 3 if has_policy else 2
  grid_spec = fig.add_gridspec(rows, max(k - 1, 1), height_ratios=[1.5, 1, 1][:rows])
  ax_front = fig.add_subplot(grid_spec[0, :])
  plot_frontier(fr.test, fr.pareto, ax=ax_front, order={m: e.mean_cost for m, e in fr.fit.items()},
                title=(f"{trace + ': ' if trace else ''}test rows, Pareto points chosen on "
                       f"fit rows"))
  hist = {}
  if has_policy:
    fit_ev = fr.splits[0]["recall"][0]
    i = choose_index(fit_ev, max_loss)
    if i is None:
      i = int(np.argmax(fit_ev.agreement))
    axes = [fig.add_subplot(grid_spec[1, j]) for j in range(max(k - 1, 1))]
    policy, lam_index, _, binning = candidate_policy(fr, "recall", i)
    plot_if_stop(policy, lam_index, axes=axes, binning=binning)
    hist["recall"] = (fr.splits[0]["recall"][1], i)
  if "global_threshold" in fr.test:
    g_fit = fr.splits[0]["global_threshold"][0]
    j = choose_index(g_fit, max_loss)
    if j is not None:
      hist["global_threshold"] = (fr.splits[0]["global_threshold"][1], j)
  ax_hist = fig.add_subplot(grid_spec[rows - 1, :])
  plot_exit_hist(hist, ax=ax_hist,
                 title=f"exit ramps on test rows at the parameter chosen for "
                       f"{max_loss * 100:g}% agreement loss")
  fig.savefig(path, dpi=dpi)
  return str(path)


def plot_placement(res, path: str, trace: Optional[str] = None) -> str:
  """Held-out agreement loss vs speedup of a `jexit.place.Placement`: the
  frontier across subsets (chosen on fit rows) against all candidate ramps'
  lam grid; the per-budget choices marked."""
  fig = _figure(figsize=(6.4, 4.2))
  ax = fig.add_subplot()
  front = res.frontier()
  ax.plot([1 - p["test_agreement"] for p in front], [p["test_speedup"] for p in front],
          ".-", ms=3, lw=1, label="frontier across subsets (fit-Pareto)")
  k = int(res.pieces.cost.shape[0])
  pos = res.position
  levels = k if pos is None else len(set(pos.tolist()))
  try:
    i = res.index(evenly_spaced(k, levels, pos))
    order = np.argsort(res.lambdas)
    ax.plot(1 - res.test_agreement[i][order], res.test_speedup[i][order], "-", lw=1,
            label="all candidate ramps")
  except ValueError:
    pass
  for b in res.budgets:
    if b.placed is not None:
      ax.plot(1 - b.placed["test"]["agreement"], b.placed["test"]["speedup"], "k*", ms=9)
      ax.annotate(f"{b.max_loss:g}: {b.placed['active_ramps']}",
                  (1 - b.placed["test"]["agreement"], b.placed["test"]["speedup"]),
                  fontsize=7, xytext=(4, -10), textcoords="offset points")
  ax.set_xscale("symlog", linthresh=1e-3)
  ax.set_xlim(0, 0.2)
  ax.set_xlabel("held-out agreement loss")
  ax.set_ylabel("held-out speedup (backbone cost / mean cost)")
  ax.set_title(f"ramp placement{'' if trace is None else ': ' + trace}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path
