"""A real ComfyUI server with this pack, and its HTTP API: start it, queue prompts, wait, fetch images.

Used by the main job (``bench/toy_comfyui.py``) and the server tests (``tests/server_support.py``).
:func:`serve` runs the host's ``main.py --cpu`` on loopback and a free port, with a base directory
whose ``custom_nodes`` links this pack, and stops it by its process id whatever happens. Standard
library only.
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
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_DIR = "comfyui-negative-guidance"
START_TIMEOUT, PROMPT_TIMEOUT = 180, 180


class ServerError(RuntimeError):
    """The server did not start, or a prompt did not finish; the message carries the server's log."""


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

    The tiny models' steps are many small ops. With torch's default of one thread per core, a
    server sharing two cores with other busy processes spent 10-15 s per soak prompt in its
    sampler (threads waiting on each other), against 0.5-1 s with one thread under the same load;
    on an idle machine one thread costs about 40% (0.37 s against 0.26 s per prompt).
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@contextlib.contextmanager
def serve(host: str, base: Path):
    """Yield ``{"url", "base", "proc"}`` for a server on ``base`` (made here: its ``custom_nodes`` links the pack)."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes").mkdir(exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
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
                raise ServerError(f"the server exited with {proc.returncode}: {(base / 'server.log').read_text()[-3000:]}")
            try:
                get(url, "/system_stats", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise ServerError("the server did not answer in time: " + (base / "server.log").read_text()[-3000:])
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


def queue(url, prompt) -> str:
    """Queue an API prompt; return its prompt id."""
    status, body = post(url, "/prompt", {"prompt": prompt})
    if status != 200:
        raise ServerError(f"the server refused the prompt ({status}): {json.dumps(body)[:2000]}")
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


def wait(url, prompt_id, timeout=PROMPT_TIMEOUT, poll=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = finished(url, prompt_id)
        if entry is not None:
            return entry
        time.sleep(poll)
    raise ServerError(f"prompt {prompt_id} did not finish in {timeout} s")


def run(url, prompt, timeout=PROMPT_TIMEOUT):
    """Queue a prompt and wait for its history entry."""
    return wait(url, queue(url, prompt), timeout)


def images(url, entry) -> list:
    """The PNG bytes of every image a finished prompt saved, by the host's ``/view``, in output order."""
    out = []
    for node_id in sorted(entry["outputs"], key=lambda k: int(k) if k.isdigit() else k):
        for image in entry["outputs"][node_id].get("images", []):
            query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
            with urllib.request.urlopen(f"{url}/view?{query}", timeout=30) as r:
                out.append(r.read())
    return out
