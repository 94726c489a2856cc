"""ConditioningDiff's pure part on synthetic conditionings: known differences give known reports."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from negative_guidance_pack.samplers import condiff


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def one_token_changed(t=5, tokens=77, width=768, batch=1):
    a = rand(batch, tokens, width, seed=1)
    b = a.clone()
    b[:, t] = rand(batch, width, seed=2)
    return a, b


def bar_heights(chart: np.ndarray, entry: int = 0, n_tokens: int = 77) -> list:
    """Coloured pixels in the middle column of each token's bar, in panel ``entry``."""
    lay = condiff.layout(n_tokens)
    top = condiff.HEADER + entry * lay.panel_height
    plot = chart[top + lay.plot_top: top + lay.plot_bottom]
    colourful = (plot.max(-1) - plot.min(-1)) > 0.25
    return [int(colourful[:, (lambda x: (x[0] + x[1]) // 2)(lay.bar_x(t))].sum()) for t in range(n_tokens)]


# ---------------------------------------------------------------------------- known differences


def test_identical_conditionings_have_cosine_one_and_no_bars():
    a = rand(1, 77, 768)
    r = condiff.diff_conditionings([[a, {}]], [[a.clone(), {}]])
    assert r.cosine == pytest.approx(1.0, abs=1e-12)
    assert np.all(r.entries[0].stats.cosine_distance < 1e-12)
    assert "none, the tokens are identical" in r.report
    assert max(bar_heights(r.chart)) == 0
    assert torch.count_nonzero(r.conditioning[0][0]) == 0  # a - 1 * a


def test_one_changed_token_peaks_in_report_and_chart():
    a, b = one_token_changed(5)
    r = condiff.diff_conditionings([[a, {}]], [[b, {}]])
    stats = r.entries[0].stats
    assert int(np.argmax(stats.cosine_distance)) == 5
    assert np.count_nonzero(stats.cosine_distance > 1e-9) == 1
    lines = r.report.splitlines()
    first = lines.index("  largest distances (1 - cos, L2):") + 1
    assert lines[first].split()[0] == "#5"
    assert lines[first + 1].strip().startswith("token")  # no other token differs
    heights = bar_heights(r.chart)
    assert int(np.argmax(heights)) == 5 and heights[5] > 100
    assert all(h == 0 for t, h in enumerate(heights) if abs(t - 5) > 6)


def test_per_token_distance_is_one_minus_cosine_and_l2():
    a, b = one_token_changed(3, tokens=8, width=16)
    stats = condiff.token_stats(a, b)
    cos = torch.nn.functional.cosine_similarity(a[0, 3].double(), b[0, 3].double(), dim=0)
    assert stats.cosine_distance[3] == pytest.approx(float(1 - cos), abs=1e-12)
    assert stats.l2[3] == pytest.approx(float((a[0, 3].double() - b[0, 3].double()).norm()), rel=1e-9)
    assert stats.norm_a[3] == pytest.approx(float(a[0, 3].double().norm()), rel=1e-9)


@pytest.mark.parametrize("b_of_a,expected", [(lambda a: 2.5 * a, 1.0), (lambda a: -a, -1.0), (lambda a: 0 * a, 0.0)])
def test_overall_cosine_of_known_pairs(b_of_a, expected):
    a = rand(2, 77, 768)
    assert condiff.diff_conditionings([[a, {}]], [[b_of_a(a), {}]]).cosine == pytest.approx(expected, abs=1e-12)


def test_orthogonal_conditionings_have_cosine_zero():
    a = torch.zeros(1, 4, 8)
    b = torch.zeros(1, 4, 8)
    a[..., 0], b[..., 1] = 1.0, 1.0
    r = condiff.diff_conditionings([[a, {}]], [[b, {}]])
    assert r.cosine == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(r.entries[0].stats.cosine_distance, 1.0)


def test_both_zero_is_cosine_one():
    z = torch.zeros(1, 4, 8)
    r = condiff.diff_conditionings([[z, {}]], [[z.clone(), {}]], "project_out")
    assert r.cosine == 1.0 and np.all(r.entries[0].stats.cosine_distance == 0)
    assert torch.all(r.conditioning[0][0] == 0)


# ---------------------------------------------------------------------------- modes


def test_subtract_is_a_minus_scale_b():
    a, b = rand(1, 77, 768, seed=1), rand(1, 77, 768, seed=2)
    out = condiff.diff_conditionings([[a, {}]], [[b, {}]], "subtract", 0.7).conditioning[0][0]
    torch.testing.assert_close(out, a - 0.7 * b)


def test_project_out_removes_bs_direction_per_token():
    a, b = rand(2, 77, 768, seed=1), rand(2, 77, 768, seed=2)
    out = condiff.diff_conditionings([[a, {}]], [[b, {}]], "project_out", 1.0).conditioning[0][0]
    dots = (out.double() * b.double()).sum(-1) / (b.double().norm(dim=-1) * out.double().norm(dim=-1))
    assert float(dots.abs().max()) < 1e-6
    coef = (a.double() * b.double()).sum(-1, keepdim=True) / (b.double() ** 2).sum(-1, keepdim=True)
    torch.testing.assert_close(out.double(), a.double() - coef * b.double(), rtol=1e-6, atol=1e-6)


def test_project_out_at_scale_zero_is_a_and_keeps_parallel_removal_linear():
    a, b = rand(1, 77, 32, seed=1), rand(1, 77, 32, seed=2)
    torch.testing.assert_close(condiff.project_out(a, b, 0.0), a)
    half = condiff.project_out(a, b, 0.5)
    full = condiff.project_out(a, b, 1.0)
    torch.testing.assert_close(half, (a + full) / 2, rtol=1e-5, atol=1e-6)


def test_project_out_of_a_zero_token_leaves_a():
    a, b = rand(1, 4, 8, seed=1), rand(1, 4, 8, seed=2)
    b[0, 2] = 0
    out = condiff.project_out(a, b, 1.0)
    torch.testing.assert_close(out[0, 2], a[0, 2])
    assert torch.isfinite(out).all()


def test_dtype_is_kept():
    a, b = rand(1, 77, 64, seed=1, dtype=torch.float16), rand(1, 77, 64, seed=2, dtype=torch.float16)
    for mode in condiff.MODES:
        out = condiff.diff_conditionings([[a, {}]], [[b, {}]], mode).conditioning[0][0]
        assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_unknown_mode_is_refused():
    a = rand(1, 4, 8)
    with pytest.raises(ValueError, match="mode"):
        condiff.diff_conditionings([[a, {}]], [[a, {}]], "divide")


# ---------------------------------------------------------------------------- pooled and dict keys


def test_pooled_output_is_handled_like_the_tokens():
    a, b = rand(1, 77, 64, seed=1), rand(1, 77, 64, seed=2)
    pa, pb = rand(1, 32, seed=3), rand(1, 32, seed=4)
    for mode, expect in (("subtract", pa - 2.0 * pb), ("project_out", condiff.project_out(pa, pb, 2.0))):
        r = condiff.diff_conditionings([[a, {"pooled_output": pa}]], [[b, {"pooled_output": pb}]], mode, 2.0)
        torch.testing.assert_close(r.conditioning[0][1]["pooled_output"], expect)
        assert r.entries[0].pooled_cosine == pytest.approx(condiff.cosine(pa, pb))
        assert "pooled cosine" in r.report


def test_pooled_only_in_a_is_copied_and_noted():
    a = rand(1, 77, 64)
    pa = rand(1, 32, seed=3)
    r = condiff.diff_conditionings([[a, {"pooled_output": pa}]], [[a, {}]])
    assert r.conditioning[0][1]["pooled_output"] is pa
    assert "only a has a pooled_output" in r.report


def test_other_keys_are_copied_and_inputs_never_mutated():
    a, b = rand(1, 77, 64, seed=1), rand(1, 77, 64, seed=2)
    pa, pb = rand(1, 32, seed=3), rand(1, 32, seed=4)
    da = {"pooled_output": pa, "area": (8, 8, 0, 0), "strength": 0.8}
    db = {"pooled_output": pb, "mask": "x"}
    ca, cb = [[a, da]], [[b, db]]
    before = [t.clone() for t in (a, b, pa, pb)]
    r = condiff.diff_conditionings(ca, cb, "project_out", 1.0)
    for t, copy in zip((a, b, pa, pb), before):
        assert torch.equal(t, copy)
    assert da == {"pooled_output": pa, "area": (8, 8, 0, 0), "strength": 0.8} and db == {"pooled_output": pb, "mask": "x"}
    out_tensor, out_dict = r.conditioning[0]
    assert r.conditioning is not ca and r.conditioning[0] is not ca[0] and out_dict is not da
    assert out_tensor.data_ptr() != a.data_ptr() and out_dict["pooled_output"].data_ptr() != pa.data_ptr()
    assert out_dict["area"] == (8, 8, 0, 0) and out_dict["strength"] == 0.8 and "mask" not in out_dict


# ---------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("n_a,n_b,expected", [
    (77, 77, (1, 1)), (77, 154, (2, 1)), (154, 77, (1, 2)), (77, 231, (3, 1)), (77, 308, (4, 1)),
    (77, 385, None), (77, 100, None), (4, 6, (3, 2)), (0, 77, None),
])
def test_repeat_factors_follow_the_host_rule(n_a, n_b, expected):
    assert condiff.repeat_factors(n_a, n_b) == expected


def test_77_against_154_repeats_the_shorter_and_a_repeated_prompt_is_identical():
    a = rand(1, 77, 64)
    r = condiff.diff_conditionings([[a, {}]], [[a.repeat(1, 2, 1), {}]])
    assert r.conditioning[0][0].shape == (1, 154, 64)
    assert r.cosine == pytest.approx(1.0, abs=1e-12)
    assert r.entries[0].factors == (2, 1)
    assert "a was repeated 2x" in r.report


def test_longer_a_keeps_its_length():
    a, b = rand(1, 154, 64, seed=1), rand(1, 77, 64, seed=2)
    out = condiff.diff_conditionings([[a, {}]], [[b, {}]]).conditioning[0][0]
    torch.testing.assert_close(out, a - b.repeat(1, 2, 1))


def test_refused_alignment_raises():
    with pytest.raises(ValueError, match="repeat factor"):
        condiff.align(rand(1, 77, 8), rand(1, 385, 8))


def test_batch_one_b_broadcasts_over_a():
    a, b = rand(3, 77, 16, seed=1), rand(1, 77, 16, seed=2)
    out = condiff.diff_conditionings([[a, {}]], [[b, {}]]).conditioning[0][0]
    torch.testing.assert_close(out, a - b)
    with pytest.raises(ValueError, match="batch"):
        condiff.align(rand(2, 77, 16), rand(3, 77, 16))


# ---------------------------------------------------------------------------- several entries


def test_entries_are_diffed_entry_by_entry():
    a1, b1 = one_token_changed(2, tokens=77, width=32)
    a2, b2 = one_token_changed(40, tokens=77, width=32)
    r = condiff.diff_conditionings([[a1, {}], [a2, {}]], [[b1, {}], [b2, {}]])
    assert [e.top(1)[0] for e in r.entries] == [2, 40]
    assert [int(np.argmax(bar_heights(r.chart, i))) for i in range(2)] == [2, 40]
    assert "entry 1:" in r.report
    torch.testing.assert_close(r.conditioning[1][0], a2 - b2)


def test_one_b_entry_applies_to_every_a_entry_and_other_counts_are_refused():
    a1, a2, b = rand(1, 77, 8, seed=1), rand(1, 77, 8, seed=2), rand(1, 77, 8, seed=3)
    r = condiff.diff_conditionings([[a1, {}], [a2, {}]], [[b, {}]])
    torch.testing.assert_close(r.conditioning[1][0], a2 - b)
    with pytest.raises(ValueError, match="entries"):
        condiff.diff_conditionings([[a1, {}], [a2, {}], [a1, {}]], [[b, {}], [b, {}]])


def test_many_entries_chart_at_most_four_panels():
    a = rand(1, 77, 8)
    r = condiff.diff_conditionings([[a, {}]] * 6, [[a, {}]])
    assert r.chart.shape[0] == condiff.HEADER + 4 * condiff.layout(77).panel_height
    assert "entry 5:" in r.report


# ---------------------------------------------------------------------------- labels and chart


def test_token_strings_in_the_dict_label_the_report():
    a, b = one_token_changed(6, tokens=8, width=16)
    words = ["<|startoftext|>", "portrait</w>", "of</w>", "a</w>", "man</w>", "without</w>", "mustache</w>", "<|endoftext|>"]
    r = condiff.diff_conditionings([[a, {"token_labels": words}]], [[b, {}]])
    assert r.entries[0].labelled and r.entries[0].labels[6] == "mustache" and r.entries[0].labels[0] == "<start>"
    assert "#6    mustache" in r.report


def test_labels_of_both_sides_show_where_they_differ_and_repeat_with_alignment():
    a, b = rand(1, 2, 8, seed=1), rand(1, 4, 8, seed=2)
    r = condiff.diff_conditionings([[a, {"tokens": ["x", "y"]}]], [[b, {"tokens": ["x", "z", "x", "y"]}]])
    assert r.entries[0].labels == ["x", "y|z", "x", "y"]
    assert r.conditioning[0][1]["tokens"] == ["x", "y", "x", "y"]


def test_without_strings_tokens_are_labelled_by_index():
    a, b = one_token_changed(5)
    r = condiff.diff_conditionings([[a, {"token_labels": ["too", "short"]}]], [[b, {}]])
    assert not r.entries[0].labelled and r.entries[0].labels[:3] == ["0", "1", "2"]
    assert "labelled by index" in r.report


@pytest.mark.parametrize("tokens", [1, 8, 77, 154, 231, 600])
def test_chart_is_a_comfy_image(tokens):
    a, b = rand(1, tokens, 16, seed=1), rand(1, tokens, 16, seed=2)
    chart = condiff.diff_conditionings([[a, {}]], [[b, {}]]).chart
    assert chart.dtype == np.float32 and chart.ndim == 3 and chart.shape[2] == 3
    assert 0.0 <= chart.min() and chart.max() <= 1.0
    assert chart.shape[1] >= condiff.layout(tokens).left + tokens * condiff.layout(tokens).pitch


@pytest.mark.parametrize("x,expected", [(0.37, 0.5), (1.0, 1.0), (1.1, 2.0), (0.0021, 0.0025), (3.0, 5.0), (0.0, 1.0)])
def test_axis_tops_are_round(x, expected):
    assert math.isclose(condiff.nice_ceiling(x), expected)
