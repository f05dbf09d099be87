"""The docstring examples of the public modules run and print what they say."""

import doctest
import importlib
import sys

import pytest


@pytest.mark.parametrize("name", ["jexit.fit", "jexit.solver", "jexit.evaluation",
                                  "jexit.protocol", "jexit.select", "jexit.report", "jexit.export",
                                  "jexit.traces", "jexit.signals", "jexit.contrib.variants"])
def test_docstring_examples(name):
  importlib.import_module(name)
  module = sys.modules[name]  # not `jexit.fit`, which is the function
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
