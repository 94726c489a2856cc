"""A real ComfyUI server for the server tests (``scripts/comfy_server.py``), with the tiny checkpoint.

``start_server`` gives the server's base directory a checkpoint folder holding the tiny random
SD1.5 checkpoint under the standard name the example workflows use, then starts it; a server that
does not start or a prompt that does not finish fails the test with the server's log.
``tests/conftest.py`` wraps it in the session-scoped ``server`` fixture, so every server test module
shares one start (about 20 s on a CPU).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import comfy_server
import pytest
from comfy_server import (  # noqa: F401  (the helpers the server tests use)
    PACK_DIR,
    PROMPT_TIMEOUT,
    ROOT,
    START_TIMEOUT,
    finished,
    free_port,
    get,
    images,
    post,
    queue,
    server_env,
)

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


@contextlib.contextmanager
def start_server(host: str, base: Path):
    """Yield ``{"url", "base", "proc"}`` for a server on ``base``; needs the host importable (``host`` fixture)."""
    from tests_support import write_tiny_sd15_checkpoint

    (base / "models" / "checkpoints").mkdir(parents=True)
    write_tiny_sd15_checkpoint(base / "models" / "checkpoints" / CHECKPOINT)
    try:
        with comfy_server.serve(host, base) as info:
            yield info
    except comfy_server.ServerError as why:
        pytest.fail(str(why), pytrace=False)


def shrink(prompt: dict, steps: int = 2) -> dict:
    """Tiny images and few steps: the test model is random and runs on a CPU."""
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if "steps" in inputs and isinstance(inputs["steps"], int) and node["class_type"] != "GuidanceVisualizer":
            inputs["steps"] = steps
    return prompt


def queue_ok(url, prompt) -> str:
    try:
        return queue(url, prompt)
    except comfy_server.ServerError as why:
        pytest.fail(str(why), pytrace=False)


def wait(url, prompt_id, timeout=PROMPT_TIMEOUT, poll=0.5):
    try:
        return comfy_server.wait(url, prompt_id, timeout, poll)
    except comfy_server.ServerError as why:
        pytest.fail(str(why), pytrace=False)


def run(url, prompt, timeout=PROMPT_TIMEOUT):
    """Queue a prompt and wait for its history entry."""
    return wait(url, queue_ok(url, prompt), timeout)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS of /proc/<pid>/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
