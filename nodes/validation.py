"""Input validation for every node: one error type, one number check, the shared socket checks.

Nothing here touches a sampling hook. A bad input raises ``InputError``, whose message reads
``"<Node>: input '<name>' <expected>, got <value>"`` and whose fields carry the same parts, so
callers and tests never parse the message. Checks that need the model (context width, pooled
vectors, latent shape) are in ``model_fit.py``.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..samplers import checks, rules
from ..samplers.checks import ParameterError
from ..samplers.schedule import check_percent_window


class InputError(ValueError):
    """Bad input to one of the pack's nodes: ``node``, the input's ``name``, what was ``expected``, what came."""

    def __init__(self, node: str, name: str, expected: str, got=None):
        self.node, self.name, self.expected, self.got = node, name, expected, got
        detail = "" if got is None else f", got {got}"
        super().__init__(f"{node}: input '{name}' {expected}{detail}")

    @classmethod
    def from_parameter(cls, node: str, error: ParameterError, inputs: dict | None = None) -> InputError:
        """The node's error for a parameter error; ``inputs`` maps a parameter to the input that feeds it."""
        return cls(node, (inputs or {}).get(error.name, error.name), error.expected, error.got)


@contextmanager
def inputs_of(node: str, inputs: dict | None = None) -> Iterator[None]:
    """Inside the block, a ``ParameterError`` (a rule's, NAG's, a window's) becomes this node's ``InputError``."""
    try:
        yield
    except ParameterError as error:
        raise InputError.from_parameter(node, error, inputs) from None


def check_number(node: str, name: str, value, low=None, high=None, *, whole: bool = False, hint: str = ""):
    """The node's number input checked by ``samplers.checks.number`` (finite, whole if asked, in range)."""
    with inputs_of(node):
        return checks.number(name, value, low, high, whole=whole, hint=hint)


def check_window(node: str, start: float, end: float, prefix: str = "") -> None:
    """Both percents finite in [0, 1] and start <= end, else an error naming the input."""
    with inputs_of(node):
        check_percent_window(start, end, prefix=prefix)


def check_choice(node: str, name: str, value, options, expected: str | None = None) -> None:
    """``value`` one of ``options``: a combo the host would otherwise resolve silently or not at all."""
    with inputs_of(node):
        checks.choice(name, value, options, expected)


def check_model(node: str, model, name: str = "model") -> None:
    """A MODEL socket's value: a ModelPatcher (anything that clones and hands out model objects)."""
    if not callable(getattr(model, "clone", None)) or not callable(getattr(model, "get_model_object", None)):
        raise InputError(node, name, "must be a MODEL (the output of a checkpoint or model loader)",
                         type(model).__name__)


def check_rule(node: str, rule, name: str = "rule") -> None:
    """An ``NG_RULE`` socket's value, when connected: one of this pack's rule objects."""
    if rule is not None and not isinstance(rule, rules.Rule):
        raise InputError(node, name, "must come from one of this pack's rule nodes", type(rule).__name__)


def check_chain(node: str, chain, entry_type: type, name: str = "negatives") -> tuple:
    """An ``NG_NEGATIVES`` socket's value: a tuple of chain entries made by Weighted Negative nodes."""
    if chain is None:
        return ()
    if not isinstance(chain, (list, tuple)):
        raise InputError(node, name, "must be a chain made by the Weighted Negative node", type(chain).__name__)
    for link in chain:
        if not isinstance(link, entry_type):
            raise InputError(node, name, "must be a chain made by the Weighted Negative node", type(link).__name__)
    return tuple(chain)


def _check_entry(entry, node: str, name: str) -> int:
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], dict):
        raise InputError(node, name, "must be a CONDITIONING: a list of [tensor, dict] pairs")
    tensor = entry[0]
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
        got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise InputError(node, name, "must carry an embedding tensor of shape [batch, tokens, width]", got)
    if tensor.numel() == 0:
        raise InputError(node, name, "must carry an embedding tensor with at least one batch row, token and "
                         "feature", list(tensor.shape))
    pooled = entry[1].get("pooled_output")
    if pooled is not None and not isinstance(pooled, torch.Tensor):
        raise InputError(node, name, "must have a tensor as 'pooled_output'", type(pooled).__name__)
    if not bool(torch.isfinite(tensor).all()) or (pooled is not None and not bool(torch.isfinite(pooled).all())):
        raise InputError(node, name, "contains NaN or infinite values (a broken text encoder or LoRA upstream?)")
    return int(tensor.shape[-1])


def conditioning_width(conditioning, node: str, name: str) -> int:
    """The embedding width of a CONDITIONING, checking it is a non-empty list of [tensor, dict]."""
    if not isinstance(conditioning, (list, tuple)) or len(conditioning) == 0:
        raise InputError(node, name, "must be a non-empty CONDITIONING list", type(conditioning).__name__)
    widths = {_check_entry(entry, node, name) for entry in conditioning}
    if len(widths) != 1:
        raise InputError(node, name, "has entries of different embedding widths", sorted(widths))
    return widths.pop()


def check_width(node: str, name: str, got: int, want: int, whose: str) -> None:
    """One conditioning's embedding width against ``whose`` (the width it is combined with, in words)."""
    if got != want:
        raise InputError(node, name, f"must have {whose} ({want}); it comes from a different text encoder or model "
                         "family", got)


def check_same_width(node: str, reference, reference_name: str, other, other_name: str) -> None:
    want = conditioning_width(reference, node, reference_name)
    got = conditioning_width(other, node, other_name)
    check_width(node, other_name, got, want, f"the embedding width of '{reference_name}'")
