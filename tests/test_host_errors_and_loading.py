"""A guider that would ignore the hooks is refused; the pack loads through the host's V3 entry point.

Every node's bad inputs are in test_host_bad_inputs.py."""
from __future__ import annotations

import asyncio
import importlib

import pytest
from conftest import PACK
from tests_support import cond, latent


def test_a_guider_that_ignores_the_hooks_is_refused(pack_nodes, tiny_model):
    custom = importlib.import_module("comfy_extras.nodes_custom_sampler")
    perpneg = importlib.import_module("comfy_extras.nodes_perpneg")
    negs = pack_nodes.WeightedNegative.execute(cond(3), 1.0, 0.0, 1.0)[0]
    patched = pack_nodes.NegativeGuidance.execute(tiny_model, 0.0, 1.0, negatives=negs)[0]
    guider = perpneg.Guider_PerpNeg(patched)
    guider.set_conds(cond(1), cond(2), cond(4))
    guider.set_cfg(7.0, 1.0)
    sigmas = custom.BasicScheduler().get_sigmas(patched, "normal", 2, 1.0)[0]
    with pytest.raises(ValueError, match="Guider_PerpNeg.*would ignore the negatives"):
        custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(0), guider,
                                              custom.comfy.samplers.sampler_object("euler"), sigmas, latent())


def test_the_pack_registers_through_comfy_entrypoint(host):
    pack = importlib.import_module(PACK)
    extension = asyncio.run(pack.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    ids = {n.define_schema().node_id for n in nodes}
    assert {"NegativeGuidance", "NegativeGuider", "NegativeGuidanceSampler", "WeightedNegative"} <= ids
    categories = {n.define_schema().category for n in nodes}
    assert all(c.startswith("sampling/negative_guidance") for c in categories), categories
    for node in nodes:
        schema = node.define_schema()
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"


def test_the_sampler_takes_every_ksampler_input_with_the_same_defaults(pack_nodes):
    host_nodes = importlib.import_module("nodes")
    ksampler = host_nodes.KSampler.INPUT_TYPES()["required"]
    schema = pack_nodes.NegativeGuidanceSampler.define_schema()
    ours = [i.id for i in schema.inputs]
    assert ours[: len(ksampler)] == list(ksampler), "KSampler's inputs must come first, in its order"
    by_id = {i.id: i for i in schema.inputs}
    for name, spec in ksampler.items():
        options = spec[1] if len(spec) > 1 else {}
        for key in ("default", "min", "max"):
            if key in options:
                assert getattr(by_id[name], key) == options[key], f"{name}.{key} differs from KSampler"


def test_the_guider_takes_every_cfgguider_input(pack_nodes):
    custom = importlib.import_module("comfy_extras.nodes_custom_sampler")
    required = custom.CFGGuider.INPUT_TYPES()["required"]
    ours = [i.id for i in pack_nodes.NegativeGuider.define_schema().inputs]
    assert ours[: len(required)] == list(required)


def test_cloned_into_custom_nodes_it_loads_through_the_hosts_loader(host, tmp_path):
    """The host's own loader, on the pack linked into a custom_nodes folder, as a user installs it."""
    from pathlib import Path

    host_nodes = importlib.import_module("nodes")
    root = Path(__file__).resolve().parents[1]
    target = tmp_path / "custom_nodes" / "comfyui-negative-guidance"
    target.parent.mkdir()
    target.symlink_to(root, target_is_directory=True)
    assert asyncio.run(host_nodes.load_custom_node(str(target), module_parent="custom_nodes"))
    for node_id in ("NegativeGuidance", "NegativeGuider", "NegativeGuidanceSampler", "WeightedNegative"):
        cls = host_nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.define_schema().category == "sampling/negative_guidance"
        assert cls.__module__.startswith(str(target).replace(".", "_x_")), "not the copy in custom_nodes"


def test_pyproject_parses_with_the_hosts_comfy_config_reader(host):
    """The registry fields, read by the host's own reader."""
    from pathlib import Path

    config_parser = importlib.import_module("comfy_config.config_parser")
    config = config_parser.extract_node_configuration(str(Path(__file__).resolve().parents[1]))
    assert config.project.name == "comfyui-negative-guidance"
    assert config.project.supported_comfyui_version == ">=0.3.64"
    assert config.tool_comfy.publisher_id == "negative-guidance"
    assert config.tool_comfy.display_name == "Negative Guidance"
    assert isinstance(config.tool_comfy.icon, str)
    assert config.project.license.file == "LICENSE"


def test_the_tiny_checkpoint_loads_as_sd15_and_samples(host, tmp_path):
    """The checkpoint server tests and soaks need: detected by the host's loader, samples, decodes."""
    import comfy.sd
    import torch
    from tests_support import write_tiny_sd15_checkpoint

    path = tmp_path / "tiny_sd15.safetensors"
    write_tiny_sd15_checkpoint(path)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    assert type(model.model.model_config).__name__ == "SD15"
    host_nodes = importlib.import_module("nodes")
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a man"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("mustache"))
    samples = host_nodes.common_ksampler(model, 0, 2, 7.0, "euler", "normal", positive, negative,
                                         {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]
    image = vae.decode(samples)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
