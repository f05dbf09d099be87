"""The README's Python example runs as written, and its commands exist."""

import os
import re
import subprocess
import sys

from jexit import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    return f.read()


def test_python_example_runs(tmp_path):
  blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
  assert blocks, "the README has a Python example"
  env = dict(os.environ, JEXIT_CACHE_DIR="")
  for code in blocks:
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
  assert os.path.exists(tmp_path / "policy.npz")


def test_every_command_line_example_parses():
  commands = [line.split("#")[0].split()[1:] for line in
              re.findall(r"^jexit .*$", _readme(), re.M)]
  parser = cli.build_parser()
  for argv in commands:
    argv = [a for a in argv if not (a.startswith("[") or a.endswith("]"))]
    args = parser.parse_args(argv)
    assert callable(args.func), argv
