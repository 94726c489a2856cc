"""A real ComfyUI server for the server tests: start it, talk to it over HTTP, read its process.

``start_server`` runs ``main.py --cpu`` on loopback and a free port, with a temporary base
directory whose ``custom_nodes`` links this pack and whose checkpoint folder holds the tiny
random SD1.5 checkpoint under the standard name the example workflows use; it stops the server
by its process id whatever happens. ``tests/conftest.py`` wraps it in the session-scoped
``server`` fixture, so every server test module shares one start (about 20 s on a CPU).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK_DIR = "comfyui-negative-guidance"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
START_TIMEOUT, PROMPT_TIMEOUT = 180, 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base, path, timeout=10):
    with urllib.request.urlopen(base + path, timeout=timeout) as r:
        return json.loads(r.read())


def post(base, path, payload, timeout=30):
    req = urllib.request.Request(base + path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def server_env() -> dict:
    """The server's environment: ours, with one torch thread unless ``OMP_NUM_THREADS`` says otherwise.

    The tiny model's steps are many small ops. With torch's default of one thread per core, a
    server sharing two cores with other busy processes spent 10-15 s per soak prompt in its
    sampler (threads waiting on each other), against 0.5-1 s with one thread under the same load;
    on an idle machine one thread costs about 40% (0.37 s against 0.26 s per prompt).
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@contextlib.contextmanager
def start_server(host: str, base: Path):
    """Yield ``{"url", "base", "proc"}`` for a server on ``base``; needs the host importable (``host`` fixture)."""
    from tests_support import write_tiny_sd15_checkpoint

    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_DIR).symlink_to(ROOT, target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    write_tiny_sd15_checkpoint(base / "models" / "checkpoints" / CHECKPOINT)
    port = free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--disable-auto-launch", "--database-url", "sqlite:///:memory:"],
        cwd=host, stdout=log, stderr=subprocess.STDOUT, env=server_env(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}: {(base / 'server.log').read_text()[-3000:]}")
            try:
                get(url, "/system_stats", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("the server did not answer in time: " + (base / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"url": url, "base": base, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


def shrink(prompt: dict, steps: int = 2) -> dict:
    """Tiny images and few steps: the test model is random and runs on a CPU."""
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if "steps" in inputs and isinstance(inputs["steps"], int) and node["class_type"] != "GuidanceVisualizer":
            inputs["steps"] = steps
    return prompt


def queue(url, prompt) -> str:
    """Queue an API prompt; return its prompt id."""
    status, body = post(url, "/prompt", {"prompt": prompt})
    assert status == 200, body
    return body["prompt_id"]


def finished(url, prompt_id):
    """The prompt's history entry once it has ended (success, error or interrupted), else None."""
    history = get(url, f"/history/{prompt_id}")
    entry = history.get(prompt_id)
    if entry is not None and entry.get("status", {}).get("completed") is not None:
        return entry
    if entry is not None and entry.get("status", {}).get("status_str") == "error":
        return entry
    return None


def wait(url, prompt_id, timeout=PROMPT_TIMEOUT, poll=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = finished(url, prompt_id)
        if entry is not None:
            return entry
        time.sleep(poll)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s")


def run(url, prompt, timeout=PROMPT_TIMEOUT):
    """Queue a prompt and wait for its history entry."""
    return wait(url, queue(url, prompt), timeout)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS of /proc/<pid>/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
