"""GuidanceVisualizer: per-step pictures of what the negative prompt did, and a chart of the run.

Takes the trace recorded by NegativeGuidanceSampler or NegativeGuider (``record_trace`` on) and
the sampler's LATENT (which makes the graph run it after sampling and ties the trace to that run).
Drawing lives in ``drawing.py`` (pure); this module only decodes previews and checks input.
"""
from __future__ import annotations

import logging

import comfy.model_management
import torch
from comfy_api.latest import io, ui

from ..samplers.trace import Trace, fingerprint
from . import drawing
from .guidance import CATEGORY, TraceType
from .validation import InputError, check_number

log = logging.getLogger(__name__)
NODE = "GuidanceVisualizer"


def check_trace(trace, latent) -> Trace:
    if trace is None:
        raise InputError(NODE, "trace", "is empty: turn on 'record_trace' on the sampler or guider that made it")
    if not isinstance(trace, Trace):
        raise InputError(NODE, "trace", "must come from NegativeGuidanceSampler or NegativeGuider", type(trace).__name__)
    if not trace.steps or trace.stats is None:
        raise InputError(NODE, "trace", "holds no recorded step: its sampler has not run yet")
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise InputError(NODE, "latent", "must be the LATENT output of the sampler that recorded the trace")
    if not bool(torch.isfinite(samples).all()):
        raise InputError(NODE, "latent", "contains NaN or infinite values: the run it comes from diverged")
    if trace.fingerprint is not None and tuple(samples.shape) != tuple(trace.fingerprint[0]):
        raise InputError(
            NODE, "latent",
            f"must have the shape of the latent the trace's run produced {list(trace.fingerprint[0])}: it comes from "
            "another sampler or model family", list(samples.shape),
        )
    if trace.fingerprint is not None and fingerprint(samples) != trace.fingerprint:
        raise InputError(
            NODE, "latent",
            "does not come from the run this trace recorded (a trace from another run): connect the LATENT of the "
            "same sampler",
        )
    return trace


class GuidanceVisualizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Guidance Visualizer",
            category=CATEGORY,
            description="Shows, step by step, the positive, negative and guided predictions and a heatmap of where "
            "the negative term moved the image, over a chart of the run's statistics (grey: negative active).",
            inputs=[
                TraceType.Input("trace", tooltip="The trace from NegativeGuidanceSampler or NegativeGuider with "
                                "record_trace on."),
                io.Latent.Input("latent", tooltip="The LATENT of the sampler that recorded the trace; it makes this "
                                "node run after sampling and checks the trace belongs to that run."),
                io.Int.Input("steps", default=6, min=1, max=64,
                             tooltip="How many steps to show as strips (1..64), spread over the run."),
                io.Vae.Input("vae", optional=True, tooltip="Decode the previews with this VAE (slower, sharper). "
                             "Without it the model's fast latent-to-RGB preview is used."),
            ],
            outputs=[io.Image.Output(tooltip="The strips over the chart, as an image.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, trace, latent, steps, vae=None) -> io.NodeOutput:
        check_number(NODE, "steps", steps, 1, whole=True)
        if vae is not None and not callable(getattr(vae, "decode", None)):
            raise InputError(NODE, "vae", "must be a VAE (the output of a checkpoint or VAE loader)",
                                   type(vae).__name__)
        image = drawing.render(check_trace(trace, latent), steps, vae,
                               check=comfy.model_management.throw_exception_if_processing_interrupted)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


NODES = [GuidanceVisualizer]
