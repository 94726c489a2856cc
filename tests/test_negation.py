"""The negation splitter on a table of phrasings: what moves, what stays, and what it must not touch."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from negative_guidance_pack.samplers import negation

# (prompt, positive, negative)
MOVES = [
    ("portrait of a man without mustache, no hat", "portrait of a man", "mustache, hat"),
    ("portrait of a man without (mustache:1.2)", "portrait of a man", "(mustache:1.2)"),
    ("a man without mustache and beard", "a man", "mustache, beard"),
    ("a man without mustache or beard", "a man", "mustache, beard"),
    ("a man without mustache, beard or glasses, studio light", "a man, studio light", "mustache, beard, glasses"),
    ("a man without mustache, beard, or glasses", "a man", "mustache, beard, glasses"),
    ("a man with no beard, studio lighting", "a man, studio lighting", "beard"),
    ("a dog, no collar", "a dog", "collar"),
    ("No people, landscape, sunset", "landscape, sunset", "people"),
    ("NO HAT, man", "man", "HAT"),
    ("Without hat, a man", "a man", "hat"),
    ("a woman not wearing glasses", "a woman", "glasses"),
    ("a man not wearing a hat or holding a sword", "a man", "hat, sword"),
    ("a man who is not smiling", "a man", "smiling"),
    ("a cat and no dog in the garden", "a cat in the garden", "dog"),
    ("a man without hat in a room with no windows", "a man in a room", "hat, windows"),
    ("a man without hat and with glasses", "a man with glasses", "hat"),
    ("a man without any hat", "a man", "hat"),
    ("a forest without (people:1.4) at dawn", "a forest at dawn", "(people:1.4)"),
    ("a car without (wheels, doors:1.3)", "a car", "(wheels, doors:1.3)"),
    ("(no hat:1.3), portrait", "portrait", "(hat:1.3)"),
    ("portrait, (man without hat:1.2), bokeh", "portrait, (man:1.2), bokeh", "(hat:1.2)"),
    ("(without glasses)", "", "(glasses)"),
    ("a room with no windows.", "a room.", "windows"),
    ("no text, no watermark, no signature", "", "text, watermark, signature"),
    ("not blurry and not dark", "", "blurry, dark"),
    ("a castle; no clouds; night", "a castle; night", "clouds"),
    ("a man without mustache\nstudio lighting", "a man\nstudio lighting", "mustache"),
    ("a non-metallic chair", "a chair", "metallic"),
    ("a sugar-free cake, text-free image", "a cake, image", "sugar, text"),
    ("Non-Smoking room", "room", "Smoking"),
    ("embedding:easynegative, no hat", "embedding:easynegative", "hat"),
    ("a [red|blue] car without wheels", "a [red|blue] car", "wheels"),
    ("no hat, no hat, no HAT", "", "hat"),
    ("a man without \\(hat\\)", "a man", "\\(hat\\)"),
]

# Stays a positive list: "and" after a comma ends the negation (documented choice).
AMBIGUOUS = [
    ("a man without mustache, blue shirt and jeans", "a man, blue shirt and jeans", "mustache"),
    ("a man without mustache, beard and glasses", "a man, beard and glasses", "mustache"),
    ("a man not wearing a hat and holding a sword", "a man holding a sword", "hat"),
]

# Must come back unchanged, byte for byte.
UNTOUCHED = [
    "no man's sky poster",
    "no man's land at dusk",
    "nothing to see",
    "Nobody home",
    "knot, notebook, snow, none, nonsense",
    "a non-stop party",
    "non-fiction book cover",
    "hands-free, duty-free shop, carefree",
    "a no-fly zone sign",
    "no-go area",
    "No 5 bus",
    "Dr. No",
    "no one in the street",
    "not only red but also blue",
    "without a doubt the best photo",
    'a sign saying "no parking"',
    "yes or no",
    "a man, no",
    "portrait of a man with a mustache, (hat:1.2), studio lighting",
    "  spaces   kept ,exactly\n as written.  ",
    "",
]


@pytest.mark.parametrize("prompt,positive,negative", MOVES + AMBIGUOUS, ids=[p for p, _, _ in MOVES + AMBIGUOUS])
def test_moves_negations(prompt, positive, negative):
    split = negation.split_negations(prompt)
    assert (split.positive, split.negative) == (positive, negative)
    assert split.changed


@pytest.mark.parametrize("prompt", UNTOUCHED)
def test_leaves_text_without_negation_unchanged(prompt):
    split = negation.split_negations(prompt)
    assert split.positive == prompt
    assert split.negative == ""
    assert not split.changed


def test_the_table_has_forty_phrasings():
    assert len(MOVES) + len(AMBIGUOUS) + len(UNTOUCHED) >= 40


@pytest.mark.parametrize("prompt,positive,negative", MOVES + AMBIGUOUS, ids=[p for p, _, _ in MOVES + AMBIGUOUS])
def test_splitting_again_moves_nothing(prompt, positive, negative):
    again = negation.split_negations(negation.split_negations(prompt).positive)
    assert not again.changed, again


@pytest.mark.parametrize("prompt,positive,negative", MOVES, ids=[p for p, _, _ in MOVES])
def test_weights_move_intact(prompt, positive, negative):
    for side in (positive, negative):
        assert side.count("(") - side.count("\\(") == side.count(")") - side.count("\\)")


def test_extra_negative_goes_after_the_moved_phrases():
    assert negation.merge_negative("mustache, hat", "blurry") == "mustache, hat, blurry"
    assert negation.merge_negative("", " blurry ") == "blurry"
    assert negation.merge_negative("hat", "") == "hat"
    assert negation.merge_negative("", "") == ""


def test_tokenize_keeps_groups_and_quotes_atomic():
    kinds = [(t.kind, t.text) for t in negation.tokenize('a (b, c:1.2) "d, e", f.')]
    assert ("group", "(b, c:1.2)") in kinds
    assert ("quote", '"d, e"') in kinds
    assert [t for k, t in kinds if k == "sep"] == [",", "."]


def test_unbalanced_parentheses_do_not_crash():
    split = negation.split_negations("a man (without hat")
    assert "man" in split.positive
    assert negation.split_negations("a man) no hat").negative == "hat"


def test_rejects_non_strings():
    with pytest.raises(TypeError):
        negation.split_negations(None)


PLAIN_WORDS = st.sampled_from(
    ["a", "man", "portrait", "with", "hat", "(red:1.2)", "snow", "knot", "nothing", "Nobody", "notebook",
     "and", "or", "in", "the", "studio", "lighting", "non-stop", "hands-free", "nonsense", "noon"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(PLAIN_WORDS, st.sampled_from([" ", ", ", "; ", "\n", "  "])), max_size=12))
def test_prompts_without_cues_are_unchanged(parts):
    text = "".join(w + s for w, s in parts)
    assert negation.split_negations(text) == negation.Split(text, "", ())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(PLAIN_WORDS | st.sampled_from(["no", "not", "without", "Without", "NO"]),
                          st.sampled_from([" ", ", ", "; ", "\n"])), max_size=12))
def test_any_mix_splits_without_error_and_moves_only_its_own_words(parts):
    text = "".join(w + s for w, s in parts)
    split = negation.split_negations(text)
    words = set(text.lower().replace(",", " ").replace(";", " ").split())
    for item in split.moved:
        assert set(item.lower().split()) <= words | {"(red:1.2)"}
