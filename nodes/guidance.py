"""The three ways into the engine, and the node that builds a chain of extra negatives.

- ``NegativeGuidance``: MODEL -> MODEL, for KSampler and every node that samples a MODEL;
- ``NegativeGuider``: a GUIDER for SamplerCustomAdvanced (CFGGuider's inputs, then the pack's);
- ``NegativeGuidanceSampler``: KSampler's inputs, then the pack's; returns a LATENT;
- ``WeightedNegative``: adds one conditioning, with a weight and a step window, to a chain.

Each is thin glue: validate (``validation``, ``model_fit``), build a ``GuidanceRequest``
(``request``), let ``hooks.apply_guidance`` patch a clone of the model.
"""
from __future__ import annotations

import importlib

import comfy.samplers
from comfy_api.latest import io

from ..samplers.trace import Trace
from .hooks import apply_guidance
from .model_fit import check_latent, check_prompts_fit_model
from .request import NegativeEntry, build_request, check_entry
from .validation import check_chain, check_choice, check_model, check_number

CATEGORY = "sampling/negative_guidance"

Negatives = io.Custom("NG_NEGATIVES")
Rule = io.Custom("NG_RULE")
TraceType = io.Custom("NG_TRACE")


def trace_input() -> io.Boolean.Input:
    return io.Boolean.Input(
        "record_trace", default=False, optional=True,
        tooltip="Record small per-step previews and statistics for the Guidance Visualizer (off: nothing recorded, "
        "no cost).",
    )


def new_trace(record_trace) -> Trace | None:
    return Trace() if record_trace else None


def _percent(name: str, default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.01, tooltip=tooltip)


def guidance_inputs() -> list:
    """The inputs the three entry points share, after their host-compatible ones."""
    return [
        Negatives.Input(
            "negatives", optional=True,
            tooltip="Extra negative prompts made by Weighted Negative nodes. All of them are predicted in "
            "the same batched model call as the positive and negative.",
        ),
        _percent(
            "negative_start_percent", 0.0,
            "Where the main negative starts acting, as a fraction of the schedule (0 = first step). "
            "Negatives mostly shape late details, so a later start saves steps with little change.",
        ),
        _percent(
            "negative_end_percent", 1.0,
            "Where the main negative stops acting (1 = last step). Outside the window the step costs "
            "one branch instead of two and uses the unconditional prompt, or no guidance.",
        ),
        io.Conditioning.Input(
            "unconditional", optional=True,
            tooltip="Optional empty-prompt conditioning. It replaces the main negative outside its window "
            "and is the reference the extra negatives push away from; without it the main negative is. "
            "Perp-Neg and dynamic negative guidance need it.",
        ),
        Rule.Input(
            "rule", optional=True,
            tooltip="How the predictions are combined (a rule node: Perp-Neg, APG, rescale, CFG-Zero*, dynamic, "
            "minimum sigma, interval, cached negative). Empty: plain CFG.",
        ),
    ]


class WeightedNegative(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WeightedNegative",
            display_name="Weighted Negative",
            category=CATEGORY,
            description="Adds one more negative prompt, with its own weight and step window, to a chain "
            "that NegativeGuidance, NegativeGuider and NegativeGuidanceSampler accept.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The extra negative prompt, encoded."),
                io.Float.Input(
                    "weight", default=1.0, min=-50.0, max=50.0, step=0.05,
                    tooltip="How hard the step is pushed away from this prompt, measured from the reference "
                    "prediction (Composable Diffusion's NOT). 0 turns it off; cfg - 1 pushes about as hard as "
                    "the main negative does; a negative weight pulls towards the prompt.",
                ),
                _percent("start_percent", 0.0, "Where this negative starts acting (0 = first step)."),
                _percent("end_percent", 1.0, "Where this negative stops acting (1 = last step)."),
                Negatives.Input("negatives", optional=True, tooltip="A chain to append this negative to."),
            ],
            outputs=[Negatives.Output(display_name="negatives", tooltip="The chain with this negative added.")],
        )

    @classmethod
    def execute(cls, conditioning, weight, start_percent, end_percent, negatives=None) -> io.NodeOutput:
        node = "WeightedNegative"
        check_entry(node, conditioning, weight, start_percent, end_percent)
        chain = check_chain(node, negatives, NegativeEntry)
        entry = NegativeEntry(list(conditioning), float(weight), float(start_percent), float(end_percent))
        return io.NodeOutput(chain + (entry,))


class NegativeGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NegativeGuidance",
            display_name="Negative Guidance (model patch)",
            category=CATEGORY,
            description="Patches a model so that any KSampler-style node uses the pack's negative guidance: "
            "extra weighted negatives in one batched call, and a step window for the main negative. "
            "At its defaults the model is unchanged.",
            inputs=[io.Model.Input("model", tooltip="The model to patch; it is cloned, never changed.")]
            + guidance_inputs(),
            outputs=[io.Model.Output(tooltip="The patched clone of the model.")],
        )

    @classmethod
    def execute(cls, model, negative_start_percent, negative_end_percent, negatives=None,
                unconditional=None, rule=None) -> io.NodeOutput:
        check_model("NegativeGuidance", model)
        request = build_request("NegativeGuidance", negatives, negative_start_percent, negative_end_percent,
                                unconditional, rule=rule)
        return io.NodeOutput(apply_guidance(model, request))


class NegativeGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NegativeGuider",
            display_name="Negative Guider",
            category=CATEGORY,
            description="CFGGuider with the pack's negative guidance, for SamplerCustomAdvanced. "
            "At its defaults it guides exactly as CFGGuider does.",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising."),
                io.Conditioning.Input("positive", tooltip="What the image should show."),
                io.Conditioning.Input("negative", tooltip="The main negative prompt: what the steps move away from."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale: D_neg + cfg * (D_pos - D_neg)."),
            ] + guidance_inputs() + [trace_input()],
            outputs=[io.Guider.Output(tooltip="A guider for SamplerCustomAdvanced."),
                     TraceType.Output(display_name="trace", tooltip="Filled when SamplerCustomAdvanced runs this "
                                      "guider with record_trace on; connect it to the Guidance Visualizer.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, negative_start_percent, negative_end_percent,
                negatives=None, unconditional=None, rule=None, record_trace=False) -> io.NodeOutput:
        node = "NegativeGuider"
        check_model(node, model)
        check_number(node, "cfg", cfg)
        trace = new_trace(record_trace)
        request = build_request(node, negatives, negative_start_percent, negative_end_percent,
                                unconditional, positive, negative, rule, trace)
        check_prompts_fit_model(node, model, [("positive", positive), ("negative", negative)])
        guider = comfy.samplers.CFGGuider(apply_guidance(model, request))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider, trace)


class NegativeGuidanceSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NegativeGuidanceSampler",
            display_name="KSampler (Negative Guidance)",
            category=CATEGORY,
            description="KSampler with the pack's negative guidance. Takes every KSampler input under the same "
            "name; at its defaults it returns KSampler's latent.",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising the latent."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of sampling steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale: D_neg + cfg * (D_pos - D_neg)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The sampling algorithm."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="How sigmas are spaced over the steps."),
                io.Conditioning.Input("positive", tooltip="What the image should show."),
                io.Conditioning.Input("negative", tooltip="The main negative prompt: what the steps move away from."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the schedule to run; below 1 keeps the input's structure."),
            ] + guidance_inputs() + [trace_input()],
            outputs=[io.Latent.Output(tooltip="The denoised latent."),
                     TraceType.Output(display_name="trace", tooltip="With record_trace on, what the guidance did at "
                                      "each step; connect it to the Guidance Visualizer.")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, negative_start_percent, negative_end_percent, negatives=None,
                unconditional=None, rule=None, record_trace=False) -> io.NodeOutput:
        node = "NegativeGuidanceSampler"
        check_model(node, model)
        check_number(node, "steps", steps, 1, whole=True)
        check_number(node, "cfg", cfg)
        for name, value, options in (("sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS),
                                     ("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS)):
            # the host would silently fall back to its first option
            check_choice(node, name, value, options, f"must be one of the host's names (e.g. {', '.join(options[:3])})")
        check_number(node, "denoise", denoise, 0, 1, hint=" (the share of the schedule to run)")
        check_latent(node, "latent_image", latent_image, model)
        trace = new_trace(record_trace)
        request = build_request(node, negatives, negative_start_percent, negative_end_percent,
                                unconditional, positive, negative, rule, trace)
        check_prompts_fit_model(node, model, [("positive", positive), ("negative", negative)])
        patched = apply_guidance(model, request)
        host_nodes = importlib.import_module("nodes")  # the host's nodes.py, not this pack's package
        (latent,) = host_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive,
                                               negative, latent_image, denoise=denoise)
        return io.NodeOutput(latent, trace)


NODES = [NegativeGuidance, NegativeGuider, NegativeGuidanceSampler, WeightedNegative]
