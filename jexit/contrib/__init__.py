"""Research options measured not to help (see `jexit.contrib.variants`)."""

from jexit.contrib.variants import candidates, fit, tilted

__all__ = ["candidates", "fit", "tilted"]
