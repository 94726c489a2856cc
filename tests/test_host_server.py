"""The pack in a real ComfyUI server: object_info, templates, every API workflow, a bad input, an interrupt.

The server (``main.py --cpu`` on loopback and a free port, a temporary base directory with this
pack linked into ``custom_nodes`` and the tiny random SD1.5 checkpoint under the standard name the
example workflows use) is the session-scoped ``server`` fixture of ``conftest.py``, started by
``server_support.start_server`` and stopped by its process id whatever happens.
"""
from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
from server_support import (  # noqa: F401  (the old private names, for modules that import them from here)
    CHECKPOINT,
    PACK_DIR,
    PROMPT_TIMEOUT,
    ROOT,
    START_TIMEOUT,
)
from server_support import (
    get as _get,
)
from server_support import (
    post as _post,
)
from server_support import (
    run as _run,
)
from server_support import (
    shrink as _shrink,
)


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


# Workflows for models whose weights no test can have (Flux's and Wan's text encoders are billions of
# parameters): the server validates them instead of running them.
NEEDS_REAL_WEIGHTS = {"negative_guidance_nag_flux", "negative_guidance_nag_wan"}
API_WORKFLOWS = sorted((ROOT / "example_workflows" / "api").glob("*.json"))
MODEL_FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name"}


@pytest.mark.parametrize("path", [p for p in API_WORKFLOWS if p.stem not in NEEDS_REAL_WEIGHTS], ids=lambda p: p.stem)
def test_every_api_workflow_runs_and_makes_images(server, path):
    result = _run(server["url"], _shrink(json.loads(path.read_text())))
    assert result["status"]["status_str"] == "success", result["status"]
    images = [img for out in result["outputs"].values() for img in out.get("images", [])]
    assert images, f"{path.name} produced no image"


@pytest.mark.parametrize("path", [p for p in API_WORKFLOWS if p.stem in NEEDS_REAL_WEIGHTS], ids=lambda p: p.stem)
def test_the_workflows_for_real_weights_fit_the_servers_nodes(server, path):
    """Every node exists, every input is one the node takes, every choice is one it offers (model files aside)."""
    info = _get(server["url"], "/object_info", timeout=60)
    for node_id, node in json.loads(path.read_text()).items():
        spec = info[node["class_type"]]["input"]
        known = {**spec.get("required", {}), **spec.get("optional", {})}
        assert set(node["inputs"]) <= set(known), (node_id, set(node["inputs"]) - set(known))
        assert set(spec.get("required", {})) <= set(node["inputs"]), (node_id, node["class_type"])
        for name, value in node["inputs"].items():
            kind = known[name][0]
            if isinstance(value, list) or name in MODEL_FILE_INPUTS:
                continue
            options = kind if isinstance(kind, list) else known[name][1].get("options") if kind == "COMBO" else None
            if options is not None:
                assert value in options, (node_id, name, value)


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


CHROMIUM = os.environ.get("NEGATIVE_GUIDANCE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def test_the_frontend_loads_every_ui_workflow_with_no_missing_node(server, tmp_path):
    """The host's real frontend in headless Chromium: each UI workflow loads, no node type is missing."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's 'chromium' package (scripts/test.sh does when it "
                    "runs as root) or set NEGATIVE_GUIDANCE_CHROMIUM")
    import playwright.sync_api as playwright
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
