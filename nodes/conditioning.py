"""Prompt tools that show why "without" fails, and move negations where they work.

- ``ConditioningDiff``: what separates two conditionings (per-token distance report and chart,
  overall cosine) and a conditioning made from them (``a - scale*b`` or ``a`` with ``b``'s
  direction projected out, per token);
- ``NegationSplitter``: "a man without mustache" -> positive "a man", negative "mustache";
- ``NegationSplitterEncode``: the same, encoded with the host's CLIP path, so one node replaces
  the two CLIPTextEncode nodes of a positive and a negative prompt.

The math, the report, the chart and the splitter are pure (``samplers/condiff.py``,
``samplers/negation.py``); this module validates, names bad inputs and calls them.
"""
from __future__ import annotations

import logging

import comfy.model_management
import torch
from comfy_api.latest import io, ui

from ..samplers import condiff, negation
from .validation import InputError, check_choice, check_number, check_same_width

log = logging.getLogger(__name__)

CATEGORY = "sampling/negative_guidance/prompt"


# ---------------------------------------------------------------------------- ConditioningDiff


def _token_tensor(conditioning, node: str, name: str) -> None:
    """Every entry's tensor must be [batch, tokens, width]."""
    for i, (tensor, _) in enumerate(conditioning):
        if tensor.ndim != 3:
            raise InputError(node, name, f"entry {i} must carry token embeddings of shape [batch, tokens, width]",
                                   list(tensor.shape))


def _check_pair(node: str, i: int, ta, da: dict, tb, db: dict) -> None:
    """Token counts the host can align, batch sizes that broadcast, pooled vectors of one width."""
    na, nb = int(ta.shape[1]), int(tb.shape[1])
    if condiff.repeat_factors(na, nb) is None:
        raise InputError(
            node, "b",
            f"(entry {i}) has {nb} tokens where 'a' has {na}: aligning them repeats the shorter up to their least "
            f"common multiple, and the host refuses a repeat factor above {condiff.MAX_REPEAT} "
            "(comfy/conds.py CONDCrossAttn.can_concat); use prompts of 75-word chunks of equal count", nb,
        )
    if int(tb.shape[0]) not in (1, int(ta.shape[0])):
        raise InputError(node, "b", f"(entry {i}) must have the batch size of 'a' ({int(ta.shape[0])}) or 1",
                               int(tb.shape[0]))
    pa, pb = condiff.pooled_of(da), condiff.pooled_of(db)
    if pa is not None and pb is not None:
        if pa.ndim != 2 or pb.ndim != 2 or pa.shape[-1] != pb.shape[-1]:
            raise InputError(node, "b", f"(entry {i}) must have a pooled_output of the shape of a's "
                                   f"{list(pa.shape)}; they come from different text encoders", list(pb.shape))
        if int(pb.shape[0]) not in (1, int(pa.shape[0])):
            raise InputError(node, "b", f"(entry {i}) must have a pooled_output batch of 1 or {int(pa.shape[0])}",
                                   int(pb.shape[0]))


def validate_diff(node: str, a, b, mode: str, scale: float) -> float:
    """All checks of ConditioningDiff, before any tensor work; returns the scale as a float."""
    check_same_width(node, a, "a", b, "b")
    _token_tensor(a, node, "a")
    _token_tensor(b, node, "b")
    check_choice(node, "mode", mode, condiff.MODES)
    scale = check_number(node, "scale", scale)
    if len(b) not in (1, len(a)):
        raise InputError(
            node, "b", f"must have one entry or as many as 'a' ({len(a)}): the diff is taken entry by entry", len(b))
    for i, (ta, da) in enumerate(a):
        tb, db = b[i] if len(b) > 1 else b[0]
        _check_pair(node, i, ta, da, tb, db)
    return scale


class ConditioningDiff(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConditioningDiff",
            display_name="Conditioning Diff",
            category=CATEGORY,
            description="Shows what separates two conditionings: the cosine similarity of the whole, a per-token "
            "report and a chart of 1 - cos per token (encode 'a man without mustache' as a and 'a man mustache' "
            "as b to see why 'without' adds mustaches). Also outputs a - scale*b, or a with b's direction "
            "removed token by token. Different lengths (77 vs 154 tokens) are aligned as the host aligns them.",
            inputs=[
                io.Conditioning.Input("a", tooltip="The first conditioning; the output keeps its dict keys."),
                io.Conditioning.Input("b", tooltip="The second conditioning: one entry, or as many entries as 'a' "
                                      "(compared entry by entry). Same embedding width as 'a'."),
                io.Combo.Input("mode", options=list(condiff.MODES), default="subtract",
                               tooltip="How the output conditioning is made. subtract: a - scale*b. project_out: "
                               "from each token of a, remove scale times its component along the same token of b "
                               "(per token; pooled vectors per sample)."),
                io.Float.Input("scale", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Strength of the subtraction or projection (-10..10; 0 returns a, 1 removes "
                               "b once or its whole direction)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="a combined with b by the mode."),
                io.Float.Output(display_name="cosine", tooltip="Cosine similarity of a and b as wholes (1 = same "
                                "direction)."),
                io.String.Output(display_name="report", tooltip="Per-token distances (1 - cos, L2, norms), largest "
                                 "first, then every token."),
                io.Image.Output(display_name="chart", tooltip="Bar chart of 1 - cos per token, peaks named."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, a, b, mode="subtract", scale=1.0) -> io.NodeOutput:
        node = "ConditioningDiff"
        scale = validate_diff(node, a, b, mode, scale)
        with torch.no_grad():
            result = condiff.diff_conditionings(a, b, mode, scale,
                                                 check=comfy.model_management.throw_exception_if_processing_interrupted)
        chart = torch.from_numpy(result.chart).unsqueeze(0)
        log.info("%s: cosine %.4f over %d entr%s", node, result.cosine, len(result.entries),
                 "y" if len(result.entries) == 1 else "ies")
        return io.NodeOutput(result.conditioning, result.cosine, result.report, chart, ui=_preview(cls, chart))


def _preview(cls, chart):
    """The chart as the node's preview (saved to the host's temp folder); none if that fails."""
    try:
        return ui.PreviewImage(chart, cls=cls)
    except OSError as e:
        log.warning("ConditioningDiff: no chart preview (%s); the IMAGE output is unaffected", e)
        return None


# ---------------------------------------------------------------------------- splitter


def _text_input(name: str = "text", optional: bool = False, tooltip: str = "") -> io.String.Input:
    return io.String.Input(name, multiline=True, dynamic_prompts=True, default="", optional=optional, tooltip=tooltip)


TEXT_TOOLTIP = ("The positive prompt as written, e.g. 'portrait of a man without mustache, no hat'. Phrases "
                "after without / no / not / never / lacking / sans / minus / except / excluding / other than / "
                "free of / devoid of, and words non-X / X-free, move to the negative; weights such as "
                "(mustache:1.2) move intact. A double negation ('not without courage') stays positive, "
                "without its two negating words.")
EXTRA_TOOLTIP = "Optional negative text appended after the moved phrases (e.g. 'blurry, low quality')."


def split_text(node: str, text, extra_negative) -> negation.Split:
    """Check the strings and split; the extra negative text goes after the moved phrases."""
    if not isinstance(text, str):
        raise InputError(node, "text", "must be a string", type(text).__name__)
    if not isinstance(extra_negative, str):
        raise InputError(node, "extra_negative", "must be a string", type(extra_negative).__name__)
    split = negation.split_negations(text, check=comfy.model_management.throw_exception_if_processing_interrupted)
    negative = negation.merge_negative(split.negative, extra_negative)
    if split.changed:
        log.info("%s: moved %s to the negative", node, ", ".join(repr(m) for m in split.moved))
    return negation.Split(split.positive, negative, split.moved)


class NegationSplitter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NegationSplitter",
            display_name="Negation Splitter",
            category=CATEGORY,
            description="Moves negations out of a positive prompt: 'portrait of a man without mustache, no hat' "
            "gives positive 'portrait of a man' and negative 'mustache, hat'. A text encoder reads 'without "
            "mustache' as 'mustache'; only the negative prompt removes things. Feed the two strings to two "
            "CLIPTextEncode nodes, or use Negation Splitter (Encode).",
            inputs=[
                _text_input(tooltip=TEXT_TOOLTIP),
                _text_input("extra_negative", optional=True, tooltip=EXTRA_TOOLTIP),
            ],
            outputs=[
                io.String.Output(display_name="positive", tooltip="The prompt without its negations."),
                io.String.Output(display_name="negative", tooltip="The moved phrases, then the extra negative."),
            ],
        )

    @classmethod
    def execute(cls, text, extra_negative="") -> io.NodeOutput:
        split = split_text("NegationSplitter", text, extra_negative)
        return io.NodeOutput(split.positive, split.negative)


def encode(clip, text: str) -> list:
    """The host's own encode path, as nodes.py CLIPTextEncode.encode does (weights keep working)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


class NegationSplitterEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NegationSplitterEncode",
            display_name="Negation Splitter (Encode)",
            category=CATEGORY,
            description="Negation Splitter followed by two CLIPTextEncode: one node gives the positive and the "
            "negative conditioning of a prompt written with 'without', 'no', 'not'. Each is exactly what "
            "CLIPTextEncode gives for the split text.",
            inputs=[
                _text_input(tooltip=TEXT_TOOLTIP),
                io.Clip.Input("clip", tooltip="The CLIP model used for encoding both texts."),
                _text_input("extra_negative", optional=True, tooltip=EXTRA_TOOLTIP),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="The encoded prompt without its negations."),
                io.Conditioning.Output(display_name="negative", tooltip="The encoded negative: moved phrases, then "
                                       "the extra negative (an empty prompt when both are empty)."),
                io.String.Output(display_name="positive_text", tooltip="The positive text that was encoded."),
                io.String.Output(display_name="negative_text", tooltip="The negative text that was encoded."),
            ],
        )

    @classmethod
    def execute(cls, text, clip, extra_negative="") -> io.NodeOutput:
        node = "NegationSplitterEncode"
        if clip is None or not hasattr(clip, "tokenize") or not hasattr(clip, "encode_from_tokens_scheduled"):
            raise InputError(node, "clip", "must be a CLIP model; a checkpoint without a text encoder gives none",
                                   type(clip).__name__)
        split = split_text(node, text, extra_negative)
        return io.NodeOutput(encode(clip, split.positive), encode(clip, split.negative), split.positive, split.negative)


NODES = [ConditioningDiff, NegationSplitter, NegationSplitterEncode]
