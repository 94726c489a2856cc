"""ComfyUI glue of the pack: V3 nodes and the adapters to the host's sampling hooks.

Importing this package imports ComfyUI; the pack's top-level ``__init__`` does so only when the
host calls ``comfy_entrypoint``.
"""
