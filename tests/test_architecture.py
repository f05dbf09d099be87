"""The package's import graph: no cycles, counting imports inside functions."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jexit"


def modules():
  out = {}
  for path in ROOT.rglob("*.py"):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def imports(path, known):
  """jexit modules that `path` imports anywhere (top level or in a function)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    else:
      continue
    found.update(n for n in names if n in known)
  return found


def cycles(graph):
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in graph:
    if v not in index:
      visit(v)
  return out


def graph_of(mods):
  # the package's __init__ re-exports everything: it is nobody's dependency
  return {m: imports(p, mods) - {m, "jexit"} for m, p in mods.items()}


def test_no_import_cycles():
  mods = modules()
  assert {"jexit.cli", "jexit.cli_args", "jexit.select", "jexit.runtime"} <= set(mods)
  assert cycles(graph_of(mods)) == []


def test_cycle_finder_finds_a_deferred_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", ["jexit.runtime", "jexit.counters", "jexit.monitor",
                                    "jexit.policy_file", "jexit.metrics"])
def test_serving_modules_do_not_reach_the_solver_or_the_cli(module):
  # what a server vendors: numpy-side modules never import JAX-side or CLI code
  mods = modules()
  graph = graph_of(mods)
  seen, todo = set(), [module]
  while todo:
    m = todo.pop()
    if m not in seen:
      seen.add(m)
      todo.extend(graph[m])
  assert not seen & {"jexit.solver", "jexit.fit", "jexit.select", "jexit.cli"}, seen
