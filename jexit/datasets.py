"""The small real trace shipped inside the package."""

import importlib.resources
import os

from jexit.traces import load_traces
from jexit.types import Traces

DEMO_TRACE = "digits_vgg11.npz"


def demo_trace_path() -> str:
  """Path of the embedded trace: a digits VGG-11 with 3 ramps (experiments/reports/TRACES.md)."""
  return os.fspath(importlib.resources.files("jexit") / "data" / DEMO_TRACE)


def load_demo_traces() -> Traces:
  """The embedded digits VGG-11 trace, validated."""
  return load_traces(demo_trace_path())
