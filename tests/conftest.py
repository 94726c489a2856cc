"""Test set-up: load the pack by path; give host tests a real ComfyUI and a tiny random model.

The host is found or made by ``scripts/comfy_host.py`` (``COMFYUI_PATH``, an earlier copy in
``.host/``, the checked source archive beside the repository, or a clone); a host test never skips
for want of it. No test may skip at all, except a GPU-only check on a machine without CUDA (its
reason starts with ``GPU-only``): any other skip fails the run. The model is an SD1.5-shaped UNet
(320 channels, context 768) cut to one level with one res block and one transformer, random
weights made here.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402  (the one lookup of the host, shared with the scripts and bench/)

comfy_host.load_pack()
PACK = comfy_host.PACK
pytest_plugins = ["no_skips", "pytester"]


@pytest.fixture(scope="session")
def host():
    """The real host, found or made by ``scripts/comfy_host.py`` and imported in-process on the CPU."""
    try:
        return str(comfy_host.import_host(cpu=True))
    except comfy_host.HostNotFound as why:
        pytest.fail(str(why), pytrace=False)


@pytest.fixture(scope="session")
def nag_oracle():
    """The folder of the reference NAG port (``NAG_ORACLE_PATH``, or unpacked from its checked archive)."""
    try:
        return comfy_host.ensure(comfy_host.NAG_ORACLE).path
    except comfy_host.HostNotFound as why:
        pytest.fail(str(why), pytrace=False)


@pytest.fixture(scope="session")
def nag_port(host, nag_oracle):
    """The reference ComfyUI NAG port (an oracle, loaded by path under a name of its own): its node module, or
    None on a host it cannot be imported into. It subclasses the host's model layers by name, and hosts drop
    them: 0.8.0 sets ``comfy.ldm.chroma.layers.DoubleStreamBlock`` to None, so the port's import fails there."""
    spec = importlib.util.spec_from_file_location("nag_reference_port", nag_oracle / "__init__.py",
                                                  submodule_search_locations=[str(nag_oracle)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["nag_reference_port"] = module
    try:
        spec.loader.exec_module(module)
    except TypeError as why:  # "NoneType takes no arguments": a class statement over a layer the host removed
        sys.modules.pop("nag_reference_port", None)
        logging.getLogger(__name__).warning("the reference NAG port does not import on this host (%s): its cases "
                                            "are checked against the host's own attention instead", why)
        return None
    return importlib.import_module("nag_reference_port.node")


@pytest.fixture(scope="session")
def tiny_model(host):
    """A ModelPatcher around a random SD1.5-shaped UNet small enough for CPU tests."""
    from tests_support import make_tiny_sd15

    return make_tiny_sd15()


@pytest.fixture(scope="session")
def pack_nodes(host):
    return importlib.import_module(f"{PACK}.nodes.guidance")


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

