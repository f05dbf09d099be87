"""Slow, obviously-correct float64 references for the exit problem (plain loops)."""

import itertools

import numpy as np


def random_model(rng, k, s, *, conditioned=False, loss_values=None):
  """A random single model: Dirichlet rows, uniform or discrete losses."""
  init = rng.dirichlet(np.ones(s))
  if loss_values is None:
    loss = rng.uniform(size=(k, s))
  else:
    loss = rng.choice(loss_values, size=(k, s))
  cost = rng.uniform(0.1, 1.0, size=k)
  if conditioned:
    x = len(np.unique(loss.astype(np.float32)))
    trans = rng.dirichlet(np.ones(s), size=(k - 1, x, s))
  else:
    trans = rng.dirichlet(np.ones(s), size=(k - 1, s))
  return init, trans, loss, cost


def solve_recall(init, trans, loss, cost, lam):
  """Backward induction over states (ramp, x, s) with Python loops.

  Returns:
    value, and per ramp k < K-1 a dict {(x, s): (stop_value, continue_value)}
    with x indexing the sorted distinct losses `grid`, and the grid.
  """
  k_count, s_count = len(loss), len(loss[0])
  grid = sorted(set(float(v) for row in loss for v in row))
  pos = {v: i for i, v in enumerate(grid)}
  idx = [[pos[float(loss[k][s])] for s in range(s_count)] for k in range(k_count)]
  conditioned = np.ndim(trans) == 4
  w_next = [[grid[x] for s in range(s_count)] for x in range(len(grid))]
  choices = [None] * (k_count - 1)
  for k in range(k_count - 2, -1, -1):
    w = [[0.0] * s_count for _ in grid]
    choices[k] = {}
    for x in range(len(grid)):
      for s in range(s_count):
        row = trans[k][x][s] if conditioned else trans[k][s]
        cont = lam * cost[k + 1]
        for b in range(s_count):
          cont += row[b] * w_next[min(x, idx[k + 1][b])][b]
        w[x][s] = min(grid[x], cont)
        choices[k][(x, s)] = (grid[x], cont)
    w_next = w
  value = lam * cost[0]
  for a in range(s_count):
    value += init[a] * w_next[idx[0][a]][a]
  return value, choices, grid


def solve_norecall(init, trans, loss, cost, lam):
  """Backward induction over (ramp, s); returns value and {(k, s): (stop, cont)}."""
  k_count, s_count = len(loss), len(loss[0])
  u_next = [float(v) for v in loss[-1]]
  choices = {}
  for k in range(k_count - 2, -1, -1):
    u = []
    for s in range(s_count):
      cont = lam * cost[k + 1] + sum(trans[k][s][b] * u_next[b] for b in range(s_count))
      choices[(k, s)] = (float(loss[k][s]), cont)
      u.append(min(float(loss[k][s]), cont))
    u_next = u
  value = lam * cost[0] + sum(init[a] * u_next[a] for a in range(s_count))
  return value, choices


def paths(init, trans):
  """Every bin path of a plain Markov model with its probability."""
  k_count = len(trans) + 1
  s_count = len(init)
  for path in itertools.product(range(s_count), repeat=k_count):
    p = init[path[0]]
    for k in range(k_count - 1):
      p *= trans[k][path[k]][path[k + 1]]
    yield path, p


def objective_of_rule(init, trans, loss, cost, lam, stop_rule, recall=True):
  """Exact expected objective of `stop_rule(k, x_value, s) -> bool` by enumeration."""
  total = 0.0
  k_count = len(loss)
  for path, p in paths(init, trans):
    best, spent = np.inf, 0.0
    for k in range(k_count):
      spent += cost[k]
      l = float(loss[k][path[k]])
      best = min(best, l)
      x = best if recall else l
      if k == k_count - 1 or stop_rule(k, x, path[k]):
        total += p * (x + lam * spent)
        break
  return total


def apparate_greedy(u, agree, cost, max_loss, steps, min_step, max_rounds=100_000):
  """Apparate's greedy threshold search, re-measuring every candidate from scratch.

  `u [N, K]` is `1 - conf`, `agree [N, K]` whether ramp k agrees with the
  final one. Each candidate's agreement loss and mean cost come from a full
  pass over the inputs (jexit.baselines updates counts incrementally).
  """
  n, k = u.shape
  ramp_cost = np.cumsum(cost)
  dirs = k - 1
  tol = 1e-12 * max(ramp_cost[-1], 1.0)

  def measure(cfg):
    stop = np.full(n, k - 1)
    for j in range(k - 2, -1, -1):  # the first ramp below its threshold wins
      stop = np.where(u[:, j] < cfg[j], j, stop)
    return 1.0 - agree[np.arange(n), stop].sum() / n, np.bincount(stop, minlength=k) @ ramp_cost / n

  best_t, best_cost = np.zeros(dirs), np.inf
  for s in steps:
    t, step = np.zeros(dirs), np.full(dirs, float(s))
    loss, cost_now = measure(t)
    for _ in range(max_rounds):
      open_dirs = [d for d in range(dirs) if t[d] <= 1]
      moved = False
      if open_dirs:
        cands = []
        for d in open_dirs:
          c = t.copy()
          c[d] = np.round(t[d] + step[d], 4)
          cands.append((d, c) + measure(c))
        feasible = [cl <= max_loss + 1e-12 for _, _, cl, _ in cands]
        real = [f and cost_now - cc > tol for f, (_, _, _, cc) in zip(feasible, cands)]
        pick = None
        if any(real):
          scores = [(cl - loss) / (cost_now - cc) if r else np.inf
                    for r, (_, _, cl, cc) in zip(real, cands)]
          pick = int(np.argmin(scores))
        else:
          free = [f and cost_now - cc <= tol and cl <= loss + 1e-12
                  for f, (_, _, cl, cc) in zip(feasible, cands)]
          pick = free.index(True) if any(free) else None
        if pick is not None:
          d = cands[pick][0]
          for f, (dd, _, cl, cc) in zip(feasible, cands):
            if f and dd != d and (cost_now - cc <= tol or abs(cl - loss) <= 1e-12):
              step[dd] *= 2
          t, loss, cost_now = cands[pick][1], cands[pick][2], cands[pick][3]
          step[d] *= 2
          moved = True
      if not moved:
        shrink = (step > min_step + 1e-12) & (t <= 1)
        if not shrink.any():
          break
        step[shrink] /= 2
    if cost_now < best_cost - tol:
      best_t, best_cost = t.copy(), cost_now
  return np.append(best_t, np.inf)
