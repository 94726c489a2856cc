"""The parameter checks of the pack (a number, a choice), and the one error they raise.

Rules, NAG's parameters, windows and traces validate their numbers here at construction. The
error carries the parameter's name, what was expected and what came as fields, so the node layer
(``nodes/validation.py``) names the node and the input without reading the message.
"""
from __future__ import annotations

import math


class ParameterError(ValueError):
    """A parameter out of its range: ``name``, ``expected`` (a phrase after the name) and ``got`` (a repr).

    ``owner`` (optional) says whose parameter it is, for a message read without a node around it.
    """

    def __init__(self, name: str, expected: str, got: str | None = None, owner: str | None = None):
        self.name, self.expected, self.got, self.owner = name, expected, got, owner
        prefix = "" if owner is None else f"{owner}: "
        detail = "" if got is None else f", got {got}"
        super().__init__(f"{prefix}{name} {expected}{detail}")


def _bounds(low, high, of: str = "") -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f"{of} at least {low}"
    if low is None:
        return f"{of} at most {high}"
    return f" in [{low}, {high}]"


def number(name: str, value, low=None, high=None, *, whole: bool = False, hint: str = "",
           owner: str | None = None) -> float | int:
    """``value`` as a float (an int when ``whole``), checked finite and within ``[low, high]``.

    ``None`` leaves an end open; ``hint`` follows the range in the message (what the range means).
    A bool is never a number here, though Python counts it as one.
    """
    if whole:
        fits = isinstance(value, int) and not isinstance(value, bool) and (
            (low is None or value >= low) and (high is None or value <= high))
        if not fits:
            raise ParameterError(name, f"must be a whole number{_bounds(low, high, ' of')}{hint}", repr(value), owner)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParameterError(name, "must be a finite number", repr(value), owner)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ParameterError(name, f"must be{_bounds(low, high)}{hint}", repr(value), owner)
    return float(value)


def choice(name: str, value, options, expected: str | None = None, owner: str | None = None):
    """``value`` if it is one of ``options``; ``expected`` words the message when the list is long."""
    if value not in options:
        raise ParameterError(name, expected or f"must be one of {', '.join(map(str, options))}", repr(value), owner)
    return value
