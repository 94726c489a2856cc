"""Written for the ComfyUI releases after the tested ones: each test simulates, on the hosts we have, a change that
later releases' own source shows under a mechanism the pack uses. The source read is Comfy-Org/ComfyUI as stored
in late 2026 (the 0.35 to 0.38 line; the snapshot does not name its release), at the commits each test cites."""
from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path

import pytest
import torch
from tests_support import cond, families, latent, rel_diff

ROOT = Path(__file__).resolve().parents[1]
PACK_CODE = sorted((ROOT / "nodes").glob("*.py")) + sorted((ROOT / "samplers").glob("*.py")) + [ROOT / "__init__.py"]


def _ksampler(host_nodes, model, pos=None, neg=None, steps=3, cfg=5.0, lat=None):
    return host_nodes.common_ksampler(model, 0, steps, cfg, "euler", "normal", pos or cond(1), neg or cond(2),
                                      lat or latent())[0]["samples"]


def _everything(pack_nodes, rules, model):
    """The model patch with an extra negative, a window, the unconditional and a nested stateful rule."""
    negs = pack_nodes.WeightedNegative.execute(cond(3), 1.5, 0.0, 1.0)[0]
    rule = rules.CachedNegative(every=2, inner=rules.MinSigma(min_sigma=2.0, inner=rules.APG(momentum=0.5)))
    return pack_nodes.NegativeGuidance.execute(model, 0.1, 1.0, negatives=negs, unconditional=cond(4), rule=rule)[0]


@pytest.fixture(scope="module")
def rules(host):
    return importlib.import_module("negative_guidance_pack.samplers.rules")


def test_the_wrappers_pass_on_keywords_they_do_not_know(pack_nodes, host_nodes, tiny_model, rules):
    """``CFGGuider.sample`` calls the OUTER_SAMPLE executor with ``latent_shapes=`` (comfy/samplers.py at
    311c01406130b2acbe8ab291043502de26cf3871: ``executor.execute(noise, ..., seed, latent_shapes=latent_shapes)``).
    An outer test wrapper adds the keyword, the pack's wrapper sits in between, an inner one takes it back out
    where this host's ``outer_sample`` has no such parameter."""
    import comfy.patcher_extension
    import comfy.samplers

    seen = []
    takes_it = "latent_shapes" in inspect.signature(comfy.samplers.CFGGuider.outer_sample).parameters  # 0.8.0 on

    def outer(executor, *args, **kwargs):
        return executor(*args, **{**kwargs, "latent_shapes": kwargs.get("latent_shapes", [args[1].shape])})

    def inner(executor, *args, **kwargs):
        seen.append(kwargs.get("latent_shapes"))
        if not takes_it:
            kwargs.pop("latent_shapes", None)
        return executor(*args, **kwargs)

    base = tiny_model.clone()
    base.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "a_later_host", outer)
    model = _everything(pack_nodes, rules, base)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "after_the_pack", inner)
    out = _ksampler(host_nodes, model)
    assert seen == [[latent()["samples"].shape]] and torch.isfinite(out).all()


class Interrupt(BaseException):
    """As comfy/model_management.py at 02b2b3886164b1fa412d393a3ed0674b9d1cf010 defines the host's interrupt:
    ``class InterruptProcessingException(BaseException)``."""


def _interrupting(model, after: int):
    import comfy.patcher_extension

    calls = []

    def wrapper(executor, *args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise Interrupt()
        return executor(*args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "interrupt", wrapper)
    return m


def test_an_interrupt_of_any_base_class_passes_through_and_leaves_nothing_behind(pack_nodes, host_nodes, custom,
                                                                                 tiny_model, rules):
    nag = importlib.import_module("negative_guidance_pack.nodes.nag")
    guided = _everything(pack_nodes, rules, tiny_model)
    with_nag = nag.NegativeAttentionGuidance.execute(guided, cond(5), 4.0, 2.5, 0.25, "L1", 0.0, 1.0)[0]
    before = {k: set(v) if isinstance(v, dict) else v for k, v in with_nag.model_options.items()}
    clean = _ksampler(host_nodes, with_nag)
    with pytest.raises(Interrupt):
        _ksampler(host_nodes, _interrupting(with_nag, after=1))
    guider = pack_nodes.NegativeGuider.execute(_interrupting(tiny_model, after=1), cond(1), cond(2), 5.0, 0.2, 1.0,
                                               negatives=pack_nodes.WeightedNegative.execute(cond(3), 1.0, 0, 1)[0],
                                               record_trace=True)[0]
    sigmas = custom.BasicScheduler().get_sigmas(tiny_model, "normal", 3, 1.0)[0]
    with pytest.raises(Interrupt):
        custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(0), guider,
                                              custom.comfy.samplers.sampler_object("euler"), sigmas, latent())
    assert {k: set(v) if isinstance(v, dict) else v for k, v in with_nag.model_options.items()} == before
    assert torch.equal(_ksampler(host_nodes, with_nag), clean)  # the next run is the run without the interrupt


def test_no_code_of_the_pack_catches_an_interrupt():
    """No bare ``except``, ``except BaseException`` or ``except Exception`` anywhere in the pack."""
    broad = []
    for path in PACK_CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler):
                names = [n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)] if node.type else ["(bare)"]
                if {"(bare)", "BaseException", "Exception"} & set(names):
                    broad.append(f"{path.name}:{node.lineno}")
    assert broad == []


def _optimized_attention_setter(function):
    """What ``ModelPatcher.set_model_optimized_attention`` puts in the slot (comfy/model_patcher.py at
    08d0e510f4e539a1db39072589817136ac6cfa7d): an override that drops the host's function and calls ``function``."""
    def optimized_attention_override(_, *args, **kwargs):
        return function(*args, **kwargs)
    return optimized_attention_override


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_nag_calls_through_an_override_the_hosts_setter_put_in_the_slot(host_nodes, family):
    import comfy.ldm.modules.attention as attention

    nag = importlib.import_module("negative_guidance_pack.nodes.nag")
    f = families.FAMILIES[family]
    model = f.model()
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return attention.attention_pytorch(*args, **kwargs)

    patched = model.clone()
    patched.model_options["transformer_options"]["optimized_attention_override"] = _optimized_attention_setter(counted)

    def run(m):
        guided = nag.NegativeAttentionGuidance.execute(m, f.cond(7, tokens=8), 4.0, 2.5, 0.25, "L1", 0.0, 1.0)[0]
        return host_nodes.common_ksampler(guided, 0, 2, 1.0, "euler", "normal", f.cond(1, tokens=8),
                                          f.cond(2, tokens=8), f.latent())[0]["samples"]

    alone = run(model)
    through = run(patched)
    assert calls and rel_diff(through, alone) <= 1e-4


def test_nag_takes_q_k_v_as_a_later_host_unwraps_them_from_containers():
    """``wrap_attn`` (comfy/ldm/modules/attention.py at 05080f6022b2572df36a0aa6bcba413209c3d265) hands a plain
    override the tensors taken out of their ``AttentionTensorContainer``s, and an override object with a
    ``container_function`` the containers themselves: NAG's override is a plain one."""
    nag_attention = importlib.import_module("negative_guidance_pack.nodes.nag_attention")
    assert not hasattr(nag_attention.attention_override, "container_function")

    class Container:
        __slots__ = ("tensor",)

        def __init__(self, tensor):
            self.tensor = tensor

        def take(self):
            tensor, self.tensor = self.tensor, None
            return tensor

    def later_wrap_attn(override, func, *args, **kwargs):
        kwargs.pop("preferred_attention", None)
        if hasattr(override, "container_function"):
            return override.container_function(*args, **kwargs)
        return override(func, *(c.take() for c in args[:3]), *args[3:], **kwargs)

    seen = []

    def override(func, *args, **kwargs):
        seen.append(all(isinstance(t, torch.Tensor) for t in args[:3]) and "preferred_attention" not in kwargs)
        return func(*args, **kwargs)

    q = k = v = torch.randn(1, 4, 8)
    out = later_wrap_attn(override, lambda q, k, v, heads: q + k + v, Container(q), Container(k), Container(v), 2,
                          preferred_attention=object())
    assert seen == [True] and torch.equal(out, q + k + v)


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node


def _io_chain(node) -> list:
    names, value = [], node.func
    while isinstance(value, ast.Attribute):
        names.append(value.attr)
        value = value.value
    return [value.id, *reversed(names)] if isinstance(value, ast.Name) else []


def test_v3_schemas_take_every_argument_after_the_id_by_keyword():
    """``Schema`` and ``Input`` gained fields in the middle of their signatures (comfy_api/latest/_io.py at
    04e2a914334246661a77665aa14068a0670e3321: ``Input(id, display_name, optional, tooltip, lazy, extra_dict,
    raw_link, advanced)``, ``Schema(node_id, display_name, category, inputs, outputs, hidden, description,
    search_aliases, ...)``): positional arguments after the id would land in the wrong ones."""
    positional = []
    for path in sorted((ROOT / "nodes").glob("*.py")):
        for call in _calls(path):
            chain = _io_chain(call)
            if chain[:1] == ["io"] and chain[-1] in ("Schema", "Input", "Output") and len(call.args) > 1:
                positional.append(f"{path.name}:{call.lineno} {'.'.join(chain)}")
            if chain[-1:] in (["Input"], ["Output"]) and chain[:1] != ["io"] and len(call.args) > 1:
                positional.append(f"{path.name}:{call.lineno} {'.'.join(chain)}")
    assert positional == []


def test_the_nodes_use_only_public_io_names(host):
    """Later hosts' ``comfy_api.latest.io`` is ``_io_public``, which exports only ``_io.__all__`` (0.8.0 on); where
    a host has that list, every ``io.<name>`` the pack uses is in it."""
    _io = importlib.import_module("comfy_api.latest._io")
    public = set(getattr(_io, "__all__", None) or [n for n in dir(_io) if not n.startswith("_")])
    used = {chain[1] for path in sorted((ROOT / "nodes").glob("*.py")) for call in _calls(path)
            if len(chain := _io_chain(call)) > 1 and chain[0] == "io"}
    used |= {node.attr for path in sorted((ROOT / "nodes").glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "io"}
    assert used and used <= public, sorted(used - public)


def test_a_missing_family_module_disables_that_family_alone(host, host_nodes, monkeypatch):
    """A release that renames or drops one family's module (as comfy/ldm moved between releases): NAG refuses that
    family by name at use, and every other family keeps working."""
    nag = importlib.import_module("negative_guidance_pack.nodes.nag")
    validation = importlib.import_module("negative_guidance_pack.nodes.validation")
    wan, sd15 = families.FAMILIES["wan"], families.FAMILIES["sd15"]
    wan_model, sd15_model = wan.model(), sd15.model()
    monkeypatch.setitem(sys.modules, "comfy.ldm.wan.model", None)  # import now raises ImportError
    with pytest.raises(validation.InputError, match="comfy.ldm.wan.model"):
        nag.NegativeAttentionGuidance.execute(wan_model, wan.cond(7, tokens=8), 4.0, 2.5, 0.25, "L1", 0.0, 1.0)
    guided = nag.NegativeAttentionGuidance.execute(sd15_model, sd15.cond(7, tokens=8), 4.0, 2.5, 0.25, "L1", 0.0,
                                                   1.0)[0]
    out = host_nodes.common_ksampler(guided, 0, 2, 1.0, "euler", "normal", sd15.cond(1, tokens=8),
                                     sd15.cond(2, tokens=8), sd15.latent())[0]["samples"]
    assert torch.isfinite(out).all()
