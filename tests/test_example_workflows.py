"""The example workflows name real nodes and inputs (``test_host_server.py`` runs them on a real server)."""
from __future__ import annotations

import asyncio
import importlib
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"
UI = sorted(EXAMPLES.glob("*.json"))
API = sorted((EXAMPLES / "api").glob("*.json"))


def test_every_ui_workflow_has_an_api_twin():
    assert UI, "no example workflow"
    assert [p.name for p in UI] == [p.name for p in API]


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_ui_workflow_links_are_consistent(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[src]["outputs"][src_slot]["type"] == nodes[dst]["inputs"][dst_slot]["type"] == kind


def _schemas(pack_nodes):
    extension = importlib.import_module("negative_guidance_pack.nodes.extension")
    nodes = asyncio.run(extension.NegativeGuidanceExtension().get_node_list())
    return {cls.define_schema().node_id: cls.define_schema() for cls in nodes}


@pytest.fixture(scope="module")
def host_node_classes(host):
    """Every node of the host, its ``comfy_extras`` ones included (FluxGuidance, ModelSamplingSD3...)."""
    host_nodes = importlib.import_module("nodes")
    if "FluxGuidance" not in host_nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(host_nodes.init_builtin_extra_nodes())
    return host_nodes.NODE_CLASS_MAPPINGS


@pytest.mark.parametrize("path", API, ids=[p.stem for p in API])
def test_api_workflow_uses_existing_nodes_and_inputs(host_node_classes, pack_nodes, path):
    ours = _schemas(pack_nodes)
    for node_id, node in json.loads(path.read_text()).items():
        kind = node["class_type"]
        if kind in ours:
            schema = ours[kind]
            names = {i.id for i in schema.inputs}
            required = {i.id for i in schema.inputs if not i.optional}
            assert set(node["inputs"]) <= names, f"{kind} has unknown inputs"
            assert required <= set(node["inputs"]), f"{kind} misses {required - set(node['inputs'])}"
        else:
            assert kind in host_node_classes, f"{kind} is not a host node"


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_ui_widget_values_fit_the_pack_nodes(host, pack_nodes, path):
    ours = _schemas(pack_nodes)
    for node in json.loads(path.read_text())["nodes"]:
        schema = ours.get(node["type"])
        if schema is None:
            continue
        widgets = [i for i in schema.inputs if i.get_io_type() in ("INT", "FLOAT", "COMBO", "STRING", "BOOLEAN")]
        extra = sum(1 for i in widgets if getattr(i, "control_after_generate", False))
        assert len(node["widgets_values"]) == len(widgets) + extra, node["type"]


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_every_ui_workflow_has_a_preview_image(path):
    """The frontend's template browser shows <name>.jpg beside <name>.json."""
    preview = path.with_suffix(".jpg")
    assert preview.exists(), f"{preview.name} is missing"
    assert preview.read_bytes()[:3] == b"\xff\xd8\xff", f"{preview.name} is not a JPEG"
