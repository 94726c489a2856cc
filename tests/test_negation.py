"""The negation splitter on a table of phrasings: what moves, what stays, and what it must not touch;
its properties on any text; and linear time against a slow reference tokenizer."""
from __future__ import annotations

import re

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
    ("a man lacking hair", "a man", "hair"),
    ("a man who is never smiling", "a man", "smiling"),
    ("a man sans hat", "a man", "hat"),
    ("a cake minus sugar", "a cake", "sugar"),
    ("all fruits except apples", "all fruits", "apples"),
    ("fruits, except apples and pears", "fruits", "apples, pears"),
    ("except for the dog, a park", "a park", "dog"),
    ("a street excluding cars", "a street", "cars"),
    ("animals other than cats", "animals", "cats"),
    ("a face free of wrinkles", "a face", "wrinkles"),
    ("a room devoid of furniture", "a room", "furniture"),
    ("not not without hat", "", "hat"),
]

# A double negation affirms: both negating words go, what they negated stays positive.
DOUBLE = [
    ("a soldier not without courage", "a soldier courage", ("not without",)),
    ("a man never without his hat", "a man his hat", ("never without",)),
    ("a garden not lacking flowers", "a garden flowers", ("not lacking",)),
    ("a castle not devoid of charm", "a castle charm", ("not devoid of",)),
    ("(not without courage:1.2), a soldier", "(courage:1.2), a soldier", ("not without",)),
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
    "nothing but blue sky",
    "not only red",
    "a never-ending road",
    "a sans-serif font",
    "a font, sans serif",
    "nothing except a hat",
    "none other than the king",
    "no one other than him",
    "free of charge",
    "minus 5 degrees",
    "never mind the rain",
    "a minuscule knot on a nonagon",
]


@pytest.mark.parametrize("prompt,positive,negative", MOVES + AMBIGUOUS, ids=[p for p, _, _ in MOVES + AMBIGUOUS])
def test_moves_negations(prompt, positive, negative):
    split = negation.split_negations(prompt)
    assert (split.positive, split.negative) == (positive, negative)
    assert split.changed


@pytest.mark.parametrize("prompt,positive,dropped", DOUBLE, ids=[p for p, _, _ in DOUBLE])
def test_a_double_negation_stays_positive_without_its_negating_words(prompt, positive, dropped):
    split = negation.split_negations(prompt)
    assert (split.positive, split.negative, split.dropped, split.changed) == (positive, "", dropped, True)
    assert not negation.split_negations(split.positive).changed


@pytest.mark.parametrize("prompt", UNTOUCHED)
def test_leaves_text_without_negation_unchanged(prompt):
    split = negation.split_negations(prompt)
    assert split.positive == prompt
    assert split.negative == ""
    assert not split.changed


@pytest.mark.parametrize("cue", sorted(negation.CUE_WORDS))
def test_every_cue_the_splitter_knows_is_needed_by_a_row_of_the_table(cue, monkeypatch):
    """The table exercises the whole vocabulary: with any one cue word taken out of the splitter, some phrasing
    of the table no longer splits as the table says."""
    monkeypatch.setattr(negation, "CUE_WORDS", negation.CUE_WORDS - {cue})
    monkeypatch.setattr(negation, "SINGLE_CUES", negation.SINGLE_CUES - {cue})
    rows = [(p, pos, neg) for p, pos, neg in MOVES + AMBIGUOUS] + [(p, pos, "") for p, pos, _ in DOUBLE]
    assert any((negation.split_negations(p).positive, negation.split_negations(p).negative) != (pos, neg)
               for p, pos, neg in rows), f"no row of the table needs {cue!r}"


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


# ---------------------------------------------------------------------------- any text


def reference_tokens(text, check=None, lo=0, hi=None, groups=None):
    """A slow tokenizer read straight from the definition: each bracket is scanned from itself to the
    end of its text (quadratic on unbalanced brackets), each character looked at alone. Adjacent
    unbalanced brackets and quotes are merged as the splitter merges them."""
    text = text[lo:len(text) if hi is None else hi]
    out, i = [], 0

    def group_end(i):
        stack, j = [{"(": ")", "[": "]", "{": "}"}[text[i]]], i + 1
        while j < len(text):
            c = text[j]
            if c == "\\":
                j += 2
                continue
            if c in "([{":
                stack.append({"(": ")", "[": "]", "{": "}"}[c])
            elif c == stack[-1]:
                stack.pop()
                if not stack:
                    return j + 1
            elif c == '"':
                if text.find('"', j + 1) < 0:
                    return None
                j = text.find('"', j + 1)
            j += 1
        return None

    def period_end(i):
        return text[i] == "." and (i + 1 == len(text) or text[i + 1].isspace())

    while i < len(text):
        c = text[i]
        if c in ",;\n" or period_end(i):
            out.append(("sep", c, "", -1))
            i += 1
        elif c.isspace():
            j = i
            while j < len(text) and text[j].isspace() and text[j] != "\n":
                j += 1
            out.append(("space", text[i:j], "", -1))
            i = j
        elif c in '([{"' and (end := group_end(i) if c != '"' else text.find('"', i + 1) + 1 or None):
            out.append(("group" if c != '"' else "quote", text[i:end], "", lo + i))
            i = end
        elif c in '()[]{}"':
            if out and out[-1][0] == "punct":
                out[-1] = ("punct", out[-1][1] + c, "", -1)
            else:
                out.append(("punct", c, "", -1))
            i += 1
        else:
            j = i
            while j < len(text) and text[j] not in ' \t\r\n,;"()[]{}' and not period_end(j):
                j += 2 if text[j] == "\\" else 1
            word = text[i:min(j, len(text))]
            out.append(("word", word, word.lower(), -1))
            i = min(j, len(text))
    return out


NASTY = st.sampled_from(list('()[]{}",;.\\:\n\t ') + ["without", "no", "not", "never", "lacking", "sans", "minus",
                                                      "except", "for", "other", "than", "free", "of", "devoid",
                                                      "a", "hat", "man", "and", "or", "with", "non-x", "x-free",
                                                      ":1.2", "1", "ñ", "不", "🎩", "\u00a0", "\x0b", "'s"])
ANY_TEXT = st.lists(NASTY, max_size=40).map("".join) | st.text(max_size=60)


@settings(max_examples=600, deadline=None)
@given(ANY_TEXT)
def test_the_tokenizer_reads_as_the_slow_reference(text):
    assert negation._tokens(text) == reference_tokens(text)


@settings(max_examples=400, deadline=None)
@given(ANY_TEXT)
def test_the_split_is_the_slow_reference_s_split(text):
    fast = negation.split_negations(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(negation, "_tokens", reference_tokens)
        slow = negation.split_negations(text)
    assert fast == slow


NEGATING = (negation.CUE_WORDS | {w for pair in negation.PAIR_CUES for w in pair} | negation.ARTICLES
            | negation.CONNECTIVES | negation.JOINERS | negation.TRAILING | negation.LEADING | {"non", "free"}
            | {w for verbs, relatives in negation.PRE_DROP.values() for w in verbs | relatives})


def words(text):
    return sorted(w for w in re.findall(r"[^\W\d_]+", text.lower()) if w not in NEGATING)


@settings(max_examples=600, deadline=None)
@given(ANY_TEXT)
def test_on_any_text_it_ends_loses_no_word_and_splitting_again_moves_nothing(text):
    split = negation.split_negations(text)
    assert words(split.positive + " " + " ".join(split.moved)) == words(text)
    again = negation.split_negations(split.positive)
    assert not again.moved, (text, split, again)


ADVERSARIAL = {  # a quarter megabyte each
    "unbalanced brackets, then cues (each bracket once scanned to the end)": ("(" * 131072 + "no " * 43691)[:262144],
    "deeply nested weights": "(" * 131067 + "no hat:1.2" + ")" * 131067,
    "escapes, quotes and weights": ('\\(a "b, (c" (d:1.1) \\) without (e:0.9), ' * 7000)[:262144],
    "unicode with negations": ("ñö 不 without 🎩 and non-ß, never 猫 or 犬; " * 7000)[:262144],
}


MEASURE = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("negation", sys.argv[1])
negation = importlib.util.module_from_spec(spec)
sys.modules["negation"] = negation
spec.loader.exec_module(negation)
text = "".join(json.loads(sys.stdin.read()))
start = time.process_time()
split = negation.split_negations(text)
print(json.dumps([time.process_time() - start, len(text), split.changed]))
"""


def test_a_megabyte_of_adversarial_text_splits_in_under_two_seconds_of_one_core():
    """Measured in a fresh interpreter (one thread, so process time is one core's time), away from the
    heap this test session has built up."""
    import json
    import subprocess
    import sys

    assert all(len(part) == 1 << 18 for part in ADVERSARIAL.values())
    out = subprocess.run([sys.executable, "-c", MEASURE, negation.__file__], input=json.dumps(list(ADVERSARIAL.values())),
                         capture_output=True, text=True, timeout=120, check=True)
    seconds, length, changed = json.loads(out.stdout)
    assert length == 1 << 20 and changed
    assert seconds < 2.0, seconds


def test_the_check_is_called_as_it_goes_and_may_stop_it():
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        negation.split_negations("a man without hat, " * 100000, check=check)
    assert len(calls) == 4
