"""jexit: optimal exit policies (with recall) for early-exit networks, in JAX.

Names that need JAX are imported on first use, so the numpy runtime
(`jexit.runtime`) can be deployed without JAX installed.
"""

import importlib

from jexit.datasets import demo_trace_path, load_demo_traces
from jexit.export import export_policy, load_policy_file, trace_sha256
from jexit.fit import fit, quantile_edges, uniform_edges
from jexit.importers import load_apparate
from jexit.metrics import Evaluation
from jexit.runtime import ExitTable
from jexit.traces import check_traces, load_traces, save_traces
from jexit.types import Binning, ExitModel, Policy, Traces

__version__ = "0.1.0"

# name -> module that defines it (imported lazily: these import JAX).
_LAZY = {
    "check_model": "jexit.solver",
    "solve": "jexit.solver",
    "evaluate": "jexit.evaluation",
    "expected_objective": "jexit.evaluation",
    "Choice": "jexit.select",
    "DEFAULT_FIT": "jexit.protocol",
    "Frontier": "jexit.protocol",
    "PAPER_FIT": "jexit.protocol",
    "choose": "jexit.select",
    "frontier": "jexit.protocol",
}

__all__ = [
    "Binning", "Evaluation", "ExitModel", "ExitTable", "Policy", "Traces",
    "check_traces", "demo_trace_path", "export_policy", "fit", "load_apparate",
    "load_demo_traces", "load_policy_file", "load_traces", "quantile_edges",
    "save_traces", "trace_sha256", "uniform_edges",
] + sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'jexit' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
