"""ConditioningDiff and the negation splitter in the real host: the host's V3 execution path, its
SD1.5 tokenizer and a full-size CLIP-L text encoder with random weights (no download)."""
from __future__ import annotations

import asyncio
import importlib
import inspect
from pathlib import Path

import pytest
import torch
from conftest import PACK
from tests_support import random_sd15_clip


@pytest.fixture(scope="module")
def conditioning(host):
    return importlib.import_module(f"{PACK}.nodes.conditioning")


@pytest.fixture(scope="module")
def clip(host):
    """comfy.sd.CLIP around the host's SD1.5 target (SD1Tokenizer + SD1ClipModel), random weights."""
    return random_sd15_clip()


@pytest.fixture
def temp_dir(host, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    return tmp_path


def run_in_host(node_cls, **inputs):
    """Run a node as the host's executor does (V3 class clone, locked execute, outputs and ui)."""
    execution = importlib.import_module("execution")
    # the hidden inputs' argument: hidden_inputs up to 0.3.7x, v3_data in 0.8.0 (execution.get_output_data)
    hidden = "v3_data" if "v3_data" in inspect.signature(execution.get_output_data).parameters else "hidden_inputs"
    output, ui, _, pending = asyncio.run(execution.get_output_data(
        "test", "1", node_cls, {k: [v] for k, v in inputs.items()}, **{hidden: {}}))
    assert not pending
    return [o[0] for o in output], ui


def text_encode(clip, text):
    return importlib.import_module("nodes").CLIPTextEncode().encode(clip, text)[0]


def same_conditioning(x, y):
    assert len(x) == len(y)
    for (tx, dx), (ty, dy) in zip(x, y):
        assert torch.equal(tx, ty)
        assert dx.keys() == dy.keys()
        for key in dx:
            vx, vy = dx[key], dy[key]
            assert torch.equal(vx, vy) if isinstance(vx, torch.Tensor) else vx == vy


# ---------------------------------------------------------------------------- splitter + encoder


def test_encode_node_equals_two_clip_text_encodes_of_the_split(conditioning, clip):
    text = "portrait of a (man:1.2) without (mustache:1.3), no hat"
    (pos, neg, pos_text, neg_text), _ = run_in_host(conditioning.NegationSplitterEncode, text=text, clip=clip,
                                                   extra_negative="blurry")
    assert (pos_text, neg_text) == ("portrait of a (man:1.2)", "(mustache:1.3), hat, blurry")
    same_conditioning(pos, text_encode(clip, "portrait of a (man:1.2)"))
    same_conditioning(neg, text_encode(clip, "(mustache:1.3), hat, blurry"))
    assert pos[0][0].shape == (1, 77, 768) and pos[0][1]["pooled_output"].shape == (1, 768)


def test_weights_survive_the_split(conditioning, clip):
    (_, neg, _, _), _ = run_in_host(conditioning.NegationSplitterEncode, text="a man without (mustache:1.5)", clip=clip)
    same_conditioning(neg, text_encode(clip, "(mustache:1.5)"))
    assert not torch.equal(neg[0][0], text_encode(clip, "mustache")[0][0])


def test_no_negation_gives_clip_text_encode_and_an_empty_negative(conditioning, clip):
    text = "portrait of a man, studio lighting"
    (pos, neg, pos_text, neg_text), _ = run_in_host(conditioning.NegationSplitterEncode, text=text, clip=clip)
    assert (pos_text, neg_text) == (text, "")
    same_conditioning(pos, text_encode(clip, text))
    same_conditioning(neg, text_encode(clip, ""))


def test_text_splitter_runs_in_the_host(conditioning):
    (pos, neg), _ = run_in_host(conditioning.NegationSplitter, text="portrait of a man without mustache, no hat")
    assert (pos, neg) == ("portrait of a man", "mustache, hat")
    (pos, neg), _ = run_in_host(conditioning.NegationSplitter, text="no man's sky", extra_negative="blurry")
    assert (pos, neg) == ("no man's sky", "blurry")


# ---------------------------------------------------------------------------- diff on real encodings


def test_diff_of_real_encodings_starts_where_the_prompts_start_to_differ(conditioning, clip, temp_dir):
    """CLIP's text attention is causal: 'portrait of a man without mustache' and 'portrait of a man'
    share tokens 0-4 exactly, so every difference is at token 5 or later."""
    a = text_encode(clip, "portrait of a man without mustache")
    b = text_encode(clip, "portrait of a man")
    (out, cosine, report, chart), ui = run_in_host(conditioning.ConditioningDiff, a=a, b=b, mode="project_out",
                                                  scale=1.0)
    from negative_guidance_pack.samplers import condiff

    stats = condiff.token_stats(*condiff.align(a[0][0], b[0][0]))
    assert float(abs(stats.cosine_distance[:5]).max()) < 1e-6 and stats.cosine_distance[5] > 1e-4
    largest = report.splitlines()[report.splitlines().index("  largest distances (1 - cos, L2):") + 1]
    assert int(largest.split()[0][1:]) >= 5
    assert -1.0 <= cosine < 1.0 and isinstance(cosine, float)
    assert out[0][0].shape == a[0][0].shape and out[0][0].dtype == a[0][0].dtype
    assert torch.allclose(out[0][0][:, :5], torch.zeros(()), atol=1e-3)  # identical tokens project to zero
    assert "pooled_output" in out[0][1] and not torch.equal(out[0][1]["pooled_output"], a[0][1]["pooled_output"])
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3 and chart.dtype == torch.float32
    assert 0.0 <= float(chart.min()) and float(chart.max()) <= 1.0
    (saved,) = ui["images"]
    assert (Path(temp_dir) / saved["subfolder"] / saved["filename"]).is_file()


def test_diff_of_a_long_and_a_short_prompt_is_aligned_like_the_host(conditioning, clip, temp_dir):
    long_a = text_encode(clip, ", ".join(["portrait of a man without mustache"] * 14))
    short_b = text_encode(clip, "portrait of a man")
    assert long_a[0][0].shape[1] == 154
    (out, _, report, _), _ = run_in_host(conditioning.ConditioningDiff, a=short_b, b=long_a, mode="subtract", scale=1.0)
    assert out[0][0].shape == (1, 154, 768)
    torch.testing.assert_close(out[0][0], short_b[0][0].repeat(1, 2, 1) - long_a[0][0])
    assert "a was repeated 2x" in report


def test_repeat_rule_matches_the_hosts_can_concat(host):
    """For every pair of lengths, refused here exactly when the host's CONDCrossAttn refuses to batch."""
    import comfy.conds

    from negative_guidance_pack.samplers import condiff

    for n_a in (1, 2, 3, 5, 77, 154, 231):
        for n_b in (1, 4, 7, 77, 100, 154, 308, 385):
            ta, tb = torch.arange(n_a * 4.0).reshape(1, n_a, 4), -torch.arange(n_b * 4.0).reshape(1, n_b, 4)
            x, y = comfy.conds.CONDCrossAttn(ta), comfy.conds.CONDCrossAttn(tb)
            factors = condiff.repeat_factors(n_a, n_b)
            assert (factors is not None) == x.can_concat(y), (n_a, n_b)
            if factors is not None:
                torch.testing.assert_close(torch.cat(condiff.align(ta, tb)), x.concat([y]))


# ---------------------------------------------------------------------------- schemas


def test_schemas_are_valid_v3_with_tooltips_and_the_prompt_category(conditioning):
    ids = []
    for node in conditioning.NODES:
        node.VALIDATE_CLASS()
        info = node.GET_NODE_INFO_V1()
        schema = node.define_schema()
        ids.append(schema.node_id)
        assert schema.category == "sampling/negative_guidance/prompt" and info["category"] == schema.category
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
    assert ids == ["ConditioningDiff", "NegationSplitter", "NegationSplitterEncode"]
    diff = conditioning.ConditioningDiff.define_schema()
    assert [o.get_io_type() for o in diff.outputs] == ["CONDITIONING", "FLOAT", "STRING", "IMAGE"]
    assert "-10" in next(i for i in diff.inputs if i.id == "scale").tooltip
