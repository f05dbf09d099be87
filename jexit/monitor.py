"""Watching a deployed exit policy: the reference, drift tests, the audited loss.

The runtimes count what they serve (`jexit.counters.Counters`). `check`
compares those counts with the fit rows' counts (a `Reference`, stored with
the policy) and returns a `Report`: ok, drift (which ramps, how much), or
budget exceeded. docs/monitor.md is the user's page.

Like `jexit.runtime`, this module needs only numpy and the standard library
(no JAX, scipy or torch) and jexit's numpy-only `counters`, `counters_file` and
`stats`, so a server may vendor them beside the runtime.
"""

import json
import math
from typing import NamedTuple, Optional, Tuple

import numpy as np

from jexit.counters import Counters, _describe, _int_array
from jexit.counters_file import MAX_ELEMENTS, _check_digest, _is_int
from jexit.stats import (SIMULATIONS, binom_sf_ge, clopper_pearson, g_test_pvalue, holm,
                         total_variation)

DEFAULT_ALPHA = 0.01
DEFAULT_MIN_EFFECT = 0.05
VERDICTS = ("ok", "drift", "budget exceeded")


# ----- the reference: the fit rows' counts, stored with the policy -----

class Reference(NamedTuple):
  """What the policy did on its fit rows: what live counts are compared with.

  Attributes:
    occupancy: `[K, S]` int, fit rows that reached ramp k with their signal
      in bin s (the policy replayed on them).
    stop_hist: `[K]` int, fit rows that stopped at ramp k.
    num_inputs: the number of fit rows.
    max_loss: the loss budget eps the policy was chosen for (rate of outputs
      that disagree with the final ramp), or None.
    certificate: JSON-ready dict describing a certified choice (eps, delta,
      n, ...), or None; passed through to the report.
  """
  occupancy: np.ndarray  # [K, S]
  stop_hist: np.ndarray  # [K]
  num_inputs: int
  max_loss: Optional[float] = None
  certificate: Optional[dict] = None

  def to_dict(self) -> dict:
    """JSON-ready (e.g. for a policy file's header); `reference_from_dict` reads it."""
    return {"occupancy": self.occupancy.tolist(), "stop_hist": self.stop_hist.tolist(),
            "num_inputs": int(self.num_inputs), "max_loss": self.max_loss,
            "certificate": self.certificate}


def check_reference(reference, name: str = "reference") -> Reference:
  """Validates a `Reference`; returns it with int64 arrays and a float max_loss.

  Raises:
    ValueError: naming the field: shapes, negative counts, sums that do not
      add up (as for `Counters`), max_loss outside [0, 1], a certificate that
      is not a JSON-ready dict.
  """
  if not isinstance(reference, Reference):
    raise ValueError(f"{name}: expected jexit.monitor.Reference, got "
                     f"{type(reference).__name__}")
  occupancy = _int_array(f"{name}.occupancy", reference.occupancy)
  if occupancy.ndim != 2 or not occupancy.shape[0] >= 1 or not occupancy.shape[1] >= 1:
    raise ValueError(f"{name}.occupancy: expected shape [K, S], got {_describe(occupancy)}")
  k = occupancy.shape[0]
  stop_hist = _int_array(f"{name}.stop_hist", reference.stop_hist, (k,))
  for field, a in (("occupancy", occupancy), ("stop_hist", stop_hist)):
    if np.any(a < 0):
      raise ValueError(f"{name}.{field}: expected counts >= 0, got {a[a < 0][:3].tolist()}")
  n = reference.num_inputs
  if not _is_int(n) or n < 1:
    raise ValueError(f"{name}.num_inputs: expected an integer >= 1, got {n!r}")
  if int(stop_hist.sum()) != n:
    raise ValueError(f"{name}.stop_hist: expected counts summing to num_inputs = {n}, got "
                     f"{stop_hist.tolist()}")
  expected = np.cumsum(stop_hist[::-1])[::-1]
  reached = occupancy.sum(axis=1)
  if not np.array_equal(reached, expected):
    r = int(np.flatnonzero(reached != expected)[0])
    raise ValueError(f"{name}.occupancy: expected row {r} to sum to the inputs that "
                     f"stopped at ramp {r} or later = {int(expected[r])}, got "
                     f"{int(reached[r])}")
  max_loss = reference.max_loss
  if max_loss is not None:
    if not (isinstance(max_loss, (int, float, np.integer, np.floating))
            and not isinstance(max_loss, (bool, np.bool_)) and 0 <= max_loss <= 1):
      raise ValueError(f"{name}.max_loss: expected a rate in [0, 1] or None, got {max_loss!r}")
    max_loss = float(max_loss)
  certificate = reference.certificate
  if certificate is not None:
    if not isinstance(certificate, dict):
      raise ValueError(f"{name}.certificate: expected a dict or None, got "
                       f"{type(certificate).__name__}")
    try:
      json.dumps(certificate, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{name}.certificate: expected a JSON-ready dict ({e})") from None
  return Reference(occupancy, stop_hist, int(n), max_loss, certificate)


def reference_from_counters(counters: Counters, *, max_loss=None,
                            certificate=None) -> Reference:
  """The counts of `counters` as a `Reference` (e.g. the fit rows replayed with
  counters on)."""
  counters.validate()
  if counters.nan.any():
    raise ValueError(f"counters.nan: a reference has a bin for every input, got NaN "
                     f"signals at ramps {np.flatnonzero(counters.nan).tolist()}")
  return check_reference(Reference(counters.occupancy.copy(), counters.stop_hist.copy(),
                                   counters.num_inputs, max_loss, certificate), "counters")


def make_reference(bins, stop_ramp, num_bins: int, *, max_loss=None,
                   certificate=None) -> Reference:
  """The `Reference` of the fit rows, from the policy replayed on them.

  Args:
    bins: `[N, K]` int bin of every fit row at every ramp (e.g. the table's
      `bins(k, signal[:, k])` per ramp, or `jexit.Binning.assign`).
    stop_ramp: `[N]` int, the ramp where the policy stopped each row (e.g.
      `ExitTable.run(...)[0]`, or `evaluate(..., return_per_input=True)`).
    num_bins: S.
    max_loss: the budget eps, or None. certificate: a JSON-ready dict or None.

  Examples:
    >>> import numpy as np
    >>> ref = make_reference(np.array([[0, 1], [2, 2], [1, 0]]), np.array([1, 0, 1]), 3)
    >>> ref.occupancy.tolist(), ref.stop_hist.tolist(), ref.num_inputs
    ([[1, 1, 1], [1, 1, 0]], [1, 2], 3)
  """
  bins = np.asarray(bins)
  if bins.ndim != 2:
    raise ValueError(f"bins: expected shape [N, K], got {_describe(bins)}")
  stop_ramp = np.asarray(stop_ramp)
  counters = Counters(bins.shape[1], num_bins, audit_rows=False)
  counters.record_batch(bins, stop_ramp, np.zeros_like(stop_ramp))
  return reference_from_counters(counters, max_loss=max_loss, certificate=certificate)


def reference_from_dict(d, name: str = "reference") -> Reference:
  """Reads `Reference.to_dict()`'s output (e.g. parsed from JSON), validated."""
  if not isinstance(d, dict):
    raise ValueError(f"{name}: expected a dict, got {type(d).__name__}")
  fields = set(Reference._fields)
  if set(d) != fields:
    raise ValueError(f"{name}: expected keys {sorted(fields)}, got {sorted(d)}")
  arrays = {}
  for key in ("occupancy", "stop_hist"):
    try:
      arrays[key] = np.asarray(d[key])
    except ValueError as e:  # ragged lists
      raise ValueError(f"{name}.{key}: expected a rectangular array ({e})") from None
    if arrays[key].size > MAX_ELEMENTS:
      raise ValueError(f"{name}.{key}: {arrays[key].size} values exceed {MAX_ELEMENTS}")
  return check_reference(Reference(arrays["occupancy"], arrays["stop_hist"], d["num_inputs"],
                                   d["max_loss"], d["certificate"]), name)


# ----- the check -----

class DriftTest(NamedTuple):
  """One drift test: live counts against the reference's (`jexit.stats.g_test`).

  Attributes:
    statistic: G. df: degrees of freedom. p_value: `Pr(chi2_df >= G)`.
    p_adjusted: Holm-adjusted over the family (every ramp and the stops).
    effect: total variation distance of the live and reference proportions.
    live, reference: the inputs each side counted.
    drift: `p_adjusted <= alpha and effect >= min_effect`.
  """
  statistic: float
  df: int
  p_value: float
  p_adjusted: float
  effect: float
  live: int
  reference: int
  drift: bool


class LossBound(NamedTuple):
  """The audited loss against the budget.

  Attributes:
    max_loss: the budget eps. audited: audited inputs. disagree: audited
      inputs whose served output disagreed with the final ramp.
    rate: `disagree / audited` (None when nothing was audited).
    lower, upper: one-sided Clopper-Pearson bounds at level alpha on the live
      disagreement rate.
    p_value: `Pr(Bin(audited, eps) >= disagree)`, the p-value of "live loss
      <= eps".
    exceeded: `lower > eps` (equivalently `p_value < alpha`): evidence that
      the live loss is above the budget.
  """
  max_loss: float
  audited: int
  disagree: int
  rate: Optional[float]
  lower: float
  upper: float
  p_value: float
  exceeded: bool


class Report(NamedTuple):
  """What `check` found.

  Attributes:
    verdict: "ok", "drift" or "budget exceeded" (takes precedence over drift;
      `drifted` still lists the drifted ramps).
    ramps: `[K]` DriftTest per ramp (bin occupancy of the inputs that reached it).
    stops: DriftTest of the stop histogram.
    budget: LossBound, or None when no budget was given.
    drifted: 0-based ramps whose occupancy test found drift.
    alpha, min_effect: the settings used.
    look, looks, alpha_look: the check's place in a series of repeated
      checks (`spent_alpha`) and the level this check used; look None: one
      check at level alpha.
    num_inputs, reference_inputs: live inputs and fit rows.
    certificate: the reference's certificate dict, or None.
  """
  verdict: str
  ramps: Tuple[DriftTest, ...]
  stops: DriftTest
  budget: Optional[LossBound]
  drifted: Tuple[int, ...]
  alpha: float
  min_effect: float
  num_inputs: int
  reference_inputs: int
  certificate: Optional[dict] = None
  look: Optional[int] = None
  looks: Optional[int] = None
  alpha_look: Optional[float] = None

  @property
  def exit_code(self) -> int:
    """0 for "ok", 1 for "drift" or "budget exceeded" (`jexit monitor`)."""
    return 0 if self.verdict == "ok" else 1

  def to_dict(self) -> dict:
    """JSON-ready (plain Python types; no NaN or inf)."""
    return {"verdict": self.verdict, "exit_code": self.exit_code,
            "drifted": list(self.drifted), "alpha": self.alpha,
            "min_effect": self.min_effect, "num_inputs": self.num_inputs,
            "reference_inputs": self.reference_inputs,
            "ramps": [t._asdict() for t in self.ramps], "stops": self.stops._asdict(),
            "budget": None if self.budget is None else self.budget._asdict(),
            "certificate": self.certificate, "look": self.look, "looks": self.looks,
            "alpha_look": self.alpha if self.alpha_look is None else self.alpha_look}


def _drift_test(ref, live, simulations: int = SIMULATIONS) -> DriftTest:
  """The unadjusted test; `check` fills in p_adjusted and drift."""
  g, df, p = g_test_pvalue(ref, live, simulations=simulations)
  effect = total_variation(ref, live)
  return DriftTest(statistic=g, df=df, p_value=p, p_adjusted=p, effect=effect,
                   live=int(np.sum(live)), reference=int(np.sum(ref)), drift=False)


def _check_rate(name, v, lo_open, hi_open):
  if (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating))
      or not ((0 < v if lo_open else 0 <= v) and (v < 1 if hi_open else v <= 1))):
    raise ValueError(f"{name}: expected a value in {'(' if lo_open else '['}0, "
                     f"1{')' if hi_open else ']'}, got {v!r}")
  return float(v)


MAX_SIMULATIONS = 99_999  # sparse-cell p-values resolve 1e-5 at most (spent levels)


def spent_alpha(alpha: float, look: Optional[int] = None,
                looks: Optional[int] = None) -> float:
  """The level of check number `look` in a series whose levels sum to <= alpha.

  A stream checked again and again is tested once per check: at level alpha
  each, the chance of at least one false alarm grows with the number of
  checks. Spending alpha over the checks keeps it <= alpha whatever the
  dependence between checks (the union bound):
    - `looks` planned checks: alpha / looks each (look 1..looks);
    - no plan (`looks` None): alpha * 6 / (pi^2 look^2) for look 1, 2, ...
      (sums to alpha over any number of checks; strict at late checks).
  `look` None: a single check, level alpha.

  Examples:
    >>> spent_alpha(0.01), spent_alpha(0.01, 3, 12)
    (0.01, 0.0008333333333333334)
    >>> round(spent_alpha(0.01, 1), 6), round(spent_alpha(0.01, 2), 6)
    (0.006079, 0.00152)
  """
  alpha = _check_rate("alpha", alpha, True, True)
  if look is None:
    if looks is not None:
      raise ValueError(f"looks: given ({looks!r}) without look; pass look, the number of "
                       f"this check (1 for the first)")
    return alpha
  if not _is_int(look) or look < 1:
    raise ValueError(f"look: expected an integer >= 1 (1 for the first check), got {look!r}")
  if looks is None:
    return alpha * 6.0 / (math.pi ** 2 * int(look) ** 2)
  if not _is_int(looks) or looks < 1:
    raise ValueError(f"looks: expected an integer >= 1 (the checks planned), got {looks!r}")
  if look > looks:
    raise ValueError(f"look: expected at most looks = {looks} (the checks planned), got "
                     f"{look}; plan more looks, or omit looks for the unbounded schedule")
  return alpha / int(looks)


def check(reference: Reference, counters: Counters, *, alpha: float = DEFAULT_ALPHA,
          min_effect: float = DEFAULT_MIN_EFFECT, max_loss: Optional[float] = None,
          policy_sha256: Optional[str] = None, look: Optional[int] = None,
          looks: Optional[int] = None) -> Report:
  """Tests live counts against the reference: drift per ramp, stops, the budget.

  Drift: per ramp k, a two-sample G-test (`jexit.stats.g_test`) of the bin
  occupancy of the live inputs that reached ramp k against the fit rows that
  did (plus a NaN category when live signals were NaN), and the same test of
  the stop histogram; chi-square p-values (simulated exact conditional
  p-values where a cell expects fewer than 5 counts, `g_test_pvalue`),
  Holm-adjusted over these K + 1 tests. A test finds drift when its adjusted
  p-value is <= alpha AND its effect size (total variation distance) is >=
  min_effect, so a long stream does not alarm on a shift too small to matter.
  Under the null (live inputs drawn i.i.d. from the fit rows' law) a "drift"
  verdict has probability <= alpha, up to the chi-square approximation where
  every cell expects 5 or more. For checks repeated on a growing stream pass
  `look` (and `looks`): both tests then run at `spent_alpha(alpha, look,
  looks)`, so the chance of any false alarm over all the checks is <= alpha.

  Budget: with eps = max_loss (else `reference.max_loss`; no test when both
  are None), the audited disagreement d of a audited inputs gives one-sided
  Clopper-Pearson bounds at level alpha; "budget exceeded" only when the
  LOWER bound exceeds eps (evidence of excess, false alarm <= alpha when the
  live loss is within budget). The upper bound is reported: above eps it says
  the audit cannot yet vouch for the budget, which is no alarm.

  Args:
    reference: the fit rows' `Reference` (`make_reference`).
    counters: the live `Counters` (same K and S).
    alpha: level of each family (drift; budget), in (0, 1).
    min_effect: smallest total variation distance that counts as drift, in
      [0, 1]; 0 alarms on any significant shift.
    max_loss: the budget eps in [0, 1]; overrides `reference.max_loss`.
    policy_sha256: the identity of the policy the reference belongs to; when
      given, counters of another policy are refused.
    look, looks: this check's number (1, 2, ...) among repeated checks of
      one stream, and how many are planned (None: unbounded); see
      `spent_alpha`. None: a single check at level alpha.

  Returns:
    A `Report`; `report.exit_code` is 0 for "ok", else 1.

  Examples:
    >>> import numpy as np
    >>> ref = make_reference(np.array([[0, 1], [1, 0], [1, 1], [0, 0]] * 50),
    ...                      np.array([1, 0, 1, 1] * 50), 2)
    >>> live = Counters(2, 2)
    >>> live.record_batch(np.array([[0, 1], [1, 0], [1, 1], [0, 0]] * 40),
    ...                   np.array([1, 0, 1, 1] * 40), np.array([1, 0, 1, 1] * 40))
    >>> report = check(ref, live)
    >>> report.verdict, report.exit_code
    ('ok', 0)
    >>> live.record_batch(np.zeros((400, 2), int), np.ones(400, int), np.ones(400, int))
    >>> check(ref, live).verdict, check(ref, live).drifted
    ('drift', (0, 1))
  """
  reference = check_reference(reference)
  if not isinstance(counters, Counters):
    raise ValueError(f"counters: expected jexit.counters.Counters, got "
                     f"{type(counters).__name__}")
  counters.validate()
  alpha = _check_rate("alpha", alpha, True, True)
  level = spent_alpha(alpha, look, looks)
  min_effect = _check_rate("min_effect", min_effect, False, False)
  if max_loss is not None:
    max_loss = _check_rate("max_loss", max_loss, False, False)
  _check_digest("policy_sha256", policy_sha256)
  if policy_sha256 is not None and counters.policy_sha256 != policy_sha256:
    raise ValueError(f"counters: counted policy {counters.policy_sha256!r}, expected the "
                     f"policy {policy_sha256!r}")
  if counters.occupancy.shape != reference.occupancy.shape:
    raise ValueError(f"counters: expected shape [K, S] = {reference.occupancy.shape} like "
                     f"the reference, got occupancy of shape {counters.occupancy.shape}")
  k = counters.num_ramps
  # Simulated p-values resolve 1 / (simulations + 1): at least 10 draws below
  # Holm's smallest threshold level / (K + 1) (capped: strict at tiny levels).
  cap = SIMULATIONS if look is None else MAX_SIMULATIONS
  sims = min(cap, max(999, int(math.ceil(10 * (k + 1) / level))))
  tests = []
  for r in range(k):
    ref, live = reference.occupancy[r], counters.occupancy[r]
    if counters.nan[r]:
      # NaN signals have no bin: one more category, which the fit rows never hit.
      ref, live = np.append(ref, 0), np.append(live, counters.nan[r])
    tests.append(_drift_test(ref, live, sims))
  tests.append(_drift_test(reference.stop_hist, counters.stop_hist, sims))
  adjusted = holm([t.p_value for t in tests])
  tests = [t._replace(p_adjusted=float(p), drift=bool(p <= level and t.effect >= min_effect))
           for t, p in zip(tests, adjusted)]
  ramps, stops = tuple(tests[:k]), tests[k]
  drifted = tuple(r for r, t in enumerate(ramps) if t.drift)

  eps = max_loss if max_loss is not None else reference.max_loss
  budget = None
  if eps is not None:
    a = counters.audited
    d = a - counters.audit_agree
    lower, upper = clopper_pearson(d, a, level)
    p = binom_sf_ge(d, a, eps)
    budget = LossBound(max_loss=eps, audited=a, disagree=d, rate=d / a if a else None,
                       lower=lower, upper=upper, p_value=p, exceeded=bool(lower > eps))
  verdict = ("budget exceeded" if budget is not None and budget.exceeded
             else "drift" if drifted or stops.drift else "ok")
  return Report(verdict=verdict, ramps=ramps, stops=stops, budget=budget, drifted=drifted,
                alpha=alpha, min_effect=min_effect, num_inputs=counters.num_inputs,
                reference_inputs=reference.num_inputs, certificate=reference.certificate,
                look=None if look is None else int(look),
                looks=None if looks is None else int(looks), alpha_look=level)
