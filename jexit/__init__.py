"""jexit: optimal exit policies (with recall) for early-exit networks, in JAX."""

from jexit.fit import fit, quantile_edges, uniform_edges
from jexit.solver import check_model, solve
from jexit.traces import check_traces, load_traces, save_traces
from jexit.types import Binning, ExitModel, Policy, Traces

__version__ = "0.1.0"

__all__ = [
    "Binning", "ExitModel", "Policy", "Traces",
    "check_model", "check_traces", "fit", "load_traces", "quantile_edges",
    "save_traces", "solve", "uniform_edges",
]
