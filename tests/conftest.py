"""Test-wide settings."""

import os

# Tests run the CLI in-process: keep JAX's compilation cache out of the home directory.
os.environ.setdefault("JEXIT_CACHE_DIR", "")
