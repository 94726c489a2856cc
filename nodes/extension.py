"""The V3 extension object that lists the pack's nodes."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import conditioning, guidance, nag, rules, toy_model, visualize


class NegativeGuidanceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return (list(guidance.NODES) + list(rules.NODES) + list(visualize.NODES) + list(conditioning.NODES)
                + list(nag.NODES) + list(toy_model.NODES))
