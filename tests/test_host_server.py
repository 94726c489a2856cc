"""The pack in a real ComfyUI server: object_info, templates, every API workflow, a bad input, an interrupt.

Starts ``main.py --cpu`` on loopback and a free port, with a temporary base directory whose
``custom_nodes`` links this pack and whose checkpoint folder holds the tiny random SD1.5 checkpoint
under the standard name the example workflows use. The server is stopped by its process id
whatever happens. Skips without ``COMFYUI_PATH``.
"""
from __future__ import annotations

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base, path, timeout=10):
    with urllib.request.urlopen(base + path, timeout=timeout) as r:
        return json.loads(r.read())


def _post(base, path, payload, timeout=30):
    req = urllib.request.Request(base + path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):
    from tests_support import write_tiny_sd15_checkpoint

    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_DIR).symlink_to(ROOT, target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    write_tiny_sd15_checkpoint(base / "models" / "checkpoints" / CHECKPOINT)
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--disable-auto-launch", "--database-url", "sqlite:///:memory:"],
        cwd=host, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}: {(base / 'server.log').read_text()[-3000:]}")
            try:
                _get(url, "/system_stats", timeout=2)
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


def _shrink(prompt: dict, steps: int = 2) -> dict:
    """Tiny images and few steps: the test model is random and runs on a CPU."""
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if "steps" in inputs and isinstance(inputs["steps"], int) and node["class_type"] != "GuidanceVisualizer":
            inputs["steps"] = steps
    return prompt


def _run(url, prompt, timeout=PROMPT_TIMEOUT):
    status, body = _post(url, "/prompt", {"prompt": prompt})
    assert status == 200, body
    prompt_id = body["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get(url, f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        if prompt_id in history and history[prompt_id].get("status", {}).get("status_str") == "error":
            return history[prompt_id]
        time.sleep(0.5)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s")


def _pack_ids():
    import asyncio
    import importlib

    extension = importlib.import_module("negative_guidance_pack.nodes.extension")
    return {n.define_schema().node_id for n in asyncio.run(extension.NegativeGuidanceExtension().get_node_list())}


def test_object_info_lists_every_node_with_tooltips_and_categories(server):
    info = _get(server["url"], "/object_info", timeout=60)
    for node_id in _pack_ids():
        assert node_id in info, f"{node_id} missing from /object_info"
        node = info[node_id]
        assert node["category"].startswith("sampling/negative_guidance"), node["category"]
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_workflow_templates_lists_the_examples(server):
    templates = _get(server["url"], "/workflow_templates")
    expected = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))
    assert sorted(templates.get(PACK_DIR, [])) == expected
    for name in expected:  # the thumbnail the template browser asks for
        with urllib.request.urlopen(f"{server['url']}/api/workflow_templates/{PACK_DIR}/{name}.jpg", timeout=10) as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"


@pytest.mark.parametrize("path", sorted((ROOT / "example_workflows" / "api").glob("*.json")), ids=lambda p: p.stem)
def test_every_api_workflow_runs_and_makes_images(server, path):
    result = _run(server["url"], _shrink(json.loads(path.read_text())))
    assert result["status"]["status_str"] == "success", result["status"]
    images = [img for out in result["outputs"].values() for img in out.get("images", [])]
    assert images, f"{path.name} produced no image"


def test_a_bad_input_is_named_and_the_server_keeps_serving(server):
    prompt = _shrink(json.loads((ROOT / "example_workflows" / "api" / "negative_guidance_basic.json").read_text()))
    prompt["5"]["inputs"]["weight"] = 1000.0  # WeightedNegative's weight is at most 50
    status, body = _post(server["url"], "/prompt", {"prompt": prompt})
    assert status == 400
    errors = body["node_errors"]["5"]
    assert errors["class_type"] == "WeightedNegative"
    assert any("weight" in json.dumps(e) for e in errors["errors"])
    assert _get(server["url"], "/system_stats")


def test_an_interrupted_prompt_leaves_the_next_one_working(server):
    url = server["url"]
    long_prompt = _shrink(json.loads((ROOT / "example_workflows" / "api" / "negative_guidance_basic.json").read_text()),
                          steps=400)
    status, body = _post(url, "/prompt", {"prompt": long_prompt})
    assert status == 200
    prompt_id = body["prompt_id"]
    deadline = time.time() + PROMPT_TIMEOUT
    while time.time() < deadline and not _get(url, "/queue")["queue_running"]:
        time.sleep(0.2)
    time.sleep(2.0)  # inside the sampler
    assert _post(url, "/interrupt", {})[0] == 200
    while time.time() < deadline:
        history = _get(url, f"/history/{prompt_id}")
        if prompt_id in history:
            break
        time.sleep(0.5)
    assert history[prompt_id]["status"]["status_str"] == "error"  # interrupted
    short = _shrink(json.loads((ROOT / "example_workflows" / "api" / "negative_guidance_basic.json").read_text()))
    short["7"]["inputs"]["seed"] = 1
    assert _run(url, short)["status"]["status_str"] == "success"


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def test_the_frontend_loads_every_ui_workflow_with_no_missing_node(server, tmp_path):
    """The host's real frontend in headless Chromium: each UI workflow loads, no node type is missing."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian's 'chromium' package): the browser test needs it")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (pip) drives Chromium here")
    shots = Path(os.environ.get("NEGATIVE_GUIDANCE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            page = context.new_page()
            page.goto(server["url"] + "/", timeout=120_000)
            page.wait_for_function("window.app && window.app.graph", timeout=120_000)
            page.wait_for_timeout(2000)
            close_dialogs = ("() => document.querySelectorAll('.p-dialog .p-dialog-close-button, "
                             ".p-dialog button[aria-label=\"Close\"]').forEach(b => b.click())")
            page.evaluate(close_dialogs)  # the first-run template dialog
            for path in sorted((ROOT / "example_workflows").glob("*.json")):
                page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", json.loads(path.read_text()))
                page.wait_for_timeout(1000)
                types = page.evaluate("() => (window.app.graph._nodes || window.app.graph.nodes)"
                                      ".map(n => [n.type, !!LiteGraph.registered_node_types[n.type]])")
                missing = [t for t, known in types if not known]
                assert types and not missing, f"{path.name}: missing node types {missing}"
                dialogs = page.evaluate("() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)")
                assert not [d for d in dialogs if "missing" in d.lower() or "error" in d.lower()], dialogs
                page.screenshot(path=str(shots / f"{path.stem}.png"))
        finally:
            browser.close()
