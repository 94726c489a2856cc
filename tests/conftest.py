"""Test set-up: load the pack by path; give host tests a real ComfyUI and a tiny random model.

Host tests need ``COMFYUI_PATH`` to point at a ComfyUI checkout (0.3.64 is the tested version)
and skip with that reason when it is unset. The model is an SD1.5-shaped UNet (320 channels,
context 768) cut to one level with one res block and one transformer, random weights made here.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK = "negative_guidance_pack"


def load_pack():
    """Import the pack under a fixed name (the repo folder's name varies; never ``import nodes``)."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


load_pack()
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _host_path():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return None, "COMFYUI_PATH is not set: host tests need a ComfyUI checkout (see README, 'Host tests')"
    if not (Path(path) / "comfy" / "samplers.py").exists():
        return None, f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/samplers.py)"
    return path, None


@pytest.fixture(scope="session")
def host():
    """The real host, imported in-process on the CPU."""
    path, why = _host_path()
    if path is None:
        pytest.skip(why)
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (must follow args.cpu)
    import comfy.sample
    import comfy.samplers

    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    importlib.import_module("nodes")  # the host's nodes.py
    return path


@pytest.fixture(scope="session")
def tiny_model(host):
    """A ModelPatcher around a random SD1.5-shaped UNet small enough for CPU tests."""
    from tests_support import make_tiny_sd15

    return make_tiny_sd15()


@pytest.fixture(scope="session")
def pack_nodes(host):
    import importlib as il

    return il.import_module(f"{PACK}.nodes.guidance")


@pytest.fixture(scope="session")
def host_nodes(host):
    """The host's own nodes.py (KSampler, common_ksampler, NODE_CLASS_MAPPINGS)."""
    return importlib.import_module("nodes")


@pytest.fixture(scope="session")
def custom(host):
    """The host's custom-sampling nodes (CFGGuider, SamplerCustomAdvanced, BasicScheduler)."""
    return importlib.import_module("comfy_extras.nodes_custom_sampler")


@pytest.fixture(scope="session")
def server(host, tmp_path_factory):
    """One real ComfyUI server (``main.py --cpu``, loopback) shared by every server test module."""
    from server_support import start_server

    with start_server(host, tmp_path_factory.mktemp("comfy_base")) as info:
        yield info
