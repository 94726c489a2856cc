"""Pure-torch guidance math for the negative-guidance pack.

Nothing in this package imports the host (``comfy``, ``nodes``, ``folder_paths``): every function
takes tensors on any device and dtype, so it can be tested without ComfyUI and reused by the toy
model and benchmarks.
"""
