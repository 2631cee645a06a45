"""Argument types shared by the ``python -m clo_ray.*`` entry points.

argparse turns a ValueError/ArgumentTypeError of a ``type=`` function into ``error: argument
--x: ...`` and exit 2, so a bad number never reaches the code as a traceback or an endless run.
"""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """An integer > 0 (``--part-rows``, ``--budget``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {value}")
    return value


def positive_number(text: str) -> float:
    """A finite number > 0 (``--num-cpus``, seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value
