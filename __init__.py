"""Negative guidance for ComfyUI: registration only.

Nothing of the host is imported here, so tools (pytest, linters) can import the package without
ComfyUI; the nodes load when the host calls ``comfy_entrypoint``.
"""


async def comfy_entrypoint():
    from .nodes.extension import NegativeGuidanceExtension

    return NegativeGuidanceExtension()
