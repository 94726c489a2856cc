"""Move negations out of a positive prompt: "a man without mustache" -> ("a man", "mustache").

Why: a CLIP text encoder has no working notion of "not". The embedding of "portrait of a man
without mustache" lies close to that of "man" plus "mustache" (Radford et al. 2021 train CLIP on
captions, which rarely describe what is absent; Alhamoud et al. 2025, "Vision-language models do
not understand negation"), so the word "without" *adds* mustaches. The only reliable "not" of a
diffusion sampler is the negative branch of classifier-free guidance (Ho & Salimans 2022), so the
negated words belong in the negative prompt.

Pure Python, no host import. The rules, in order:

- the text is cut into segments at ``,`` ``;`` newlines and sentence-ending periods; parentheses,
  brackets, braces and double quotes are atomic (their commas do not cut, quoted text is never
  touched), so weights such as ``(mustache:1.2)`` move intact;
- a segment is scanned for the cue words ``without``, ``no``, ``not`` (whole words, any case).
  The negated span runs from the cue to the next stop word (a preposition, a participle such as
  ``wearing``/``holding``, a relative pronoun, another cue) or the end of the segment; ``and``,
  ``or`` and ``nor`` inside it split it into items. Leading articles and ``wearing``/``with``
  style fillers are dropped from each item ("not wearing a hat" -> "hat");
- a span that reaches the end of its segment continues over following comma segments only when
  the list closes with ``or``/``nor`` ("without mustache, beard or glasses"); with ``and`` the
  comma ends it, because "without hat, blue shirt and jeans" is as common as a negated list;
- words ``non-X`` and ``X-free`` move ``X`` ("a sugar-free cake" -> "a cake" / "sugar");
- a weighted group whose text holds a negation is split inside and keeps its weight on both
  sides: "(man without hat:1.2)" -> "(man:1.2)" / "(hat:1.2)";
- left untouched: a cue with nothing to negate ("yes or no"), "no" before a possessive or a number
  ("no man's sky", "No 5"), fixed phrases ("no one", "no longer", "not only", "not just"),
  lexicalised ``non-``/``-free`` words (``non-stop``, ``non-fiction``, ``hands-free``,
  ``duty-free``), and words that merely contain a cue ("nothing", "Nobody", "knot", "notebook",
  "snow", "none", "nonsense", "no-fly zone").

Text with no negation comes back unchanged, byte for byte.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

CUES = frozenset({"without", "no", "not"})
JOINERS = frozenset({"and", "or", "nor", "&"})
# Participles end a negated noun phrase, but may be the first thing negated ("not smiling").
PARTICIPLES = frozenset({"wearing", "holding", "standing", "sitting", "walking", "looking", "lying",
                         "running", "smiling", "facing"})
# Words after which the negated span ends (only once it has content).
STOP = frozenset({
    "in", "on", "at", "with", "under", "over", "by", "near", "behind", "beside", "besides", "next",
    "from", "into", "onto", "against", "inside", "outside", "during", "while", "who", "which", "that",
    "where", "when", "but", "is", "are", "was", "were", "has", "have", "for", "to", "as", "like", "above",
    "below", "between", "through", "across", "around", "along",
}) | CUES | PARTICIPLES
ARTICLES = frozenset({"a", "an", "the", "any", "some", "single"})
# Dropped at the start of the first item only ("not wearing a hat" -> "hat").
CONNECTIVES = frozenset({"wearing", "having", "holding", "showing", "containing", "with", "include", "including"})
# The next word after the cue that makes it a fixed phrase, not a negation to move.
GUARDS = {
    "no": frozenset({"one", "longer", "matter", "doubt", "way", "more", "less", "sooner", "wonder"}),
    "not": frozenset({"only", "just", "even", "quite", "yet", "really", "that", "so", "much", "too",
                      "very", "all", "always", "necessarily", "sure"}),
    "without": frozenset({"doubt"}),
}
# Words removed with the cue when they stand just before it ("a man with no hat" -> "a man").
PRE_DROP = {
    "no": (frozenset({"with", "has", "have", "having"}), frozenset({"who", "that", "which"})),
    "not": (frozenset({"is", "are", "was", "were", "be", "being", "do", "does"}), frozenset({"who", "that", "which"})),
    "without": (frozenset({"is", "are", "was", "were"}), frozenset({"who", "that", "which"})),
}
PRE_JOINERS = frozenset({"and", "or", "but"})
# Dangling words trimmed from the ends of a segment that lost a negation.
TRAILING = frozenset({"and", "or", "nor", "but", "with", "of", "who", "that", "which", "is", "are", "&"})
LEADING = frozenset({"and", "or", "nor", "but", "&"})
# Lexicalised words that are not negations of a visible thing.
NON_KEEP = frozenset({"stop", "fiction", "binary", "profit", "stick", "slip", "sense", "existent",
                      "descript", "chalant", "toxic", "negotiable", "verbal", "zero", "linear", "euclidean"})
FREE_KEEP = frozenset({"hands", "duty", "tax", "toll", "fancy", "scot", "care", "royalty", "rent", "fee",
                       "interest", "risk", "cruelty", "hassle", "worry", "stress", "trouble", "lock"})

_NON = re.compile(r"^non-(.+)$", re.IGNORECASE)
_FREE = re.compile(r"^(.+)-free$", re.IGNORECASE)
_WEIGHTED = re.compile(r"^\((?P<inner>.*):\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)$", re.DOTALL)
_NUMBER = re.compile(r"^[#\d]")
_OPEN = {"(": ")", "[": "]", "{": "}"}
_WORD_END = set(" \t\r\n,;\"()[]{}")


@dataclass(frozen=True)
class Token:
    kind: str  # word, group, quote, space, sep, punct
    text: str

    @property
    def low(self) -> str:
        return self.text.lower() if self.kind == "word" else ""


@dataclass(frozen=True)
class Split:
    """The result: what stays positive, what moves to the negative, and each moved item."""

    positive: str
    negative: str
    moved: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def changed(self) -> bool:
        return bool(self.moved)


# ---------------------------------------------------------------------------- lexing


def _read_group(text: str, i: int) -> Optional[int]:
    """End (exclusive) of the balanced group opening at ``text[i]``, or None when unbalanced."""
    stack = [_OPEN[text[i]]]
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c in _OPEN:
            stack.append(_OPEN[c])
        elif c == stack[-1]:
            stack.pop()
            if not stack:
                return j + 1
        elif c == '"':
            end = text.find('"', j + 1)
            if end < 0:
                return None
            j = end
        j += 1
    return None


def _is_period_end(text: str, i: int) -> bool:
    return text[i] == "." and (i + 1 == len(text) or text[i + 1].isspace())


def tokenize(text: str) -> List[Token]:
    """Cut a prompt into words, atomic groups/quotes, spaces, separators and other punctuation."""
    out: List[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in ",;\n" or _is_period_end(text, i):
            out.append(Token("sep", c))
            i += 1
        elif c.isspace():
            j = i
            while j < n and text[j].isspace() and text[j] != "\n":
                j += 1
            out.append(Token("space", text[i:j]))
            i = j
        elif c in _OPEN or c == '"':
            end = _read_group(text, i) if c in _OPEN else (text.find('"', i + 1) + 1 or None)
            if end is None:
                out.append(Token("punct", c))
                i += 1
            else:
                out.append(Token("group" if c in _OPEN else "quote", text[i:end]))
                i = end
        elif c in ")]}":
            out.append(Token("punct", c))
            i += 1
        else:
            j = i
            while j < n and text[j] not in _WORD_END and not _is_period_end(text, j):
                j += 2 if text[j] == "\\" else 1
            out.append(Token("word", text[i:min(j, n)]))
            i = min(j, n)
    return out


def segments(tokens: Sequence[Token]) -> Tuple[List[List[Token]], List[str]]:
    """Tokens between separators, and the separators (one fewer than the segments)."""
    segs: List[List[Token]] = [[]]
    seps: List[str] = []
    for t in tokens:
        if t.kind == "sep":
            seps.append(t.text)
            segs.append([])
        else:
            segs[-1].append(t)
    return segs, seps


# ---------------------------------------------------------------------------- one segment


def _next(tokens: Sequence[Token], k: int) -> int:
    """Index of the next non-space token at or after ``k`` (len(tokens) when none)."""
    while k < len(tokens) and tokens[k].kind == "space":
        k += 1
    return k


def _prev(tokens: Sequence[Token], k: int) -> int:
    """Index of the previous non-space token before ``k`` (-1 when none)."""
    k -= 1
    while k >= 0 and tokens[k].kind == "space":
        k -= 1
    return k


def _guarded(cue: str, tokens: Sequence[Token], q: int) -> bool:
    """True when the cue at hand is a fixed phrase ("no one", "without a doubt") or has nothing to negate."""
    while q < len(tokens) and tokens[q].low in ARTICLES and _next(tokens, q + 1) < len(tokens):
        q = _next(tokens, q + 1)
    if q >= len(tokens) or tokens[q].kind in ("punct", "quote"):
        return True
    t = tokens[q]
    if t.kind != "word":
        return False
    low = t.low
    return (low in GUARDS[cue] or low in JOINERS or low.endswith(("'s", "\u2019s", "'", "\u2019"))
            or bool(_NUMBER.match(low)) or (low in STOP and low not in CONNECTIVES | PARTICIPLES))


def _items_text(item: Sequence[Token]) -> str:
    return re.sub(r"\s+", " ", "".join(t.text for t in item)).strip()


def _span(tokens: Sequence[Token], q: int) -> Tuple[List[str], int, bool]:
    """Items negated from ``q`` on, the end index of the span, and whether it reached the segment end."""
    items: List[List[Token]] = []
    cur: List[Token] = []
    first, expecting, k = True, True, q
    while k < len(tokens):
        t = tokens[k]
        if t.kind == "space":
            if cur:
                cur.append(t)
            k += 1
            continue
        if t.kind == "punct":
            break
        if t.kind in ("group", "quote"):
            cur.append(t)
            expecting = False
            k += 1
            continue
        low = t.low
        if expecting and (low in ARTICLES or (first and low in CONNECTIVES)):
            k += 1
            continue
        if low in JOINERS and cur:
            after = _next(tokens, k + 1)
            nxt = tokens[after].low if after < len(tokens) else ""
            # "not wearing a hat or holding a sword": "or" carries the negation over a participle.
            carried = low in ("or", "nor") and nxt in PARTICIPLES | CONNECTIVES
            if not carried and (after >= len(tokens) or tokens[after].kind == "punct" or nxt in STOP):
                k = after if after >= len(tokens) else k + 1  # drop the joiner with the span
                break
            items.append(cur)
            cur, first, expecting = [], carried, True
            k += 1
            continue
        if (low in STOP or low in JOINERS) and (cur or not (first and low in PARTICIPLES)):
            break
        cur.append(t)
        expecting = False
        k += 1
    if cur:
        items.append(cur)
    texts = [s for s in (_items_text(i) for i in items) if s]
    reached_end = _next(tokens, k) >= len(tokens)
    return texts, k, reached_end


def _pre_drop_start(cue: str, tokens: Sequence[Token], p: int) -> int:
    """Extend a removal that starts at the cue back over "with", "who is", a joiner..."""
    verbs, relatives = PRE_DROP[cue]
    start = p
    for group in (verbs, relatives, PRE_JOINERS):
        k = _prev(tokens, start)
        if k >= 0 and tokens[k].low in group:
            start = k
    return start


def _word_negation(t: Token) -> Optional[str]:
    """The moved stem of a ``non-X`` or ``X-free`` word, or None."""
    if t.kind != "word":
        return None
    m = _NON.match(t.text)
    if m and m.group(1).lower() not in NON_KEEP and m.group(1)[:1].isalpha():
        return m.group(1)
    m = _FREE.match(t.text)
    if m and m.group(1).lower() not in FREE_KEEP and m.group(1)[:1].isalnum():
        return m.group(1)
    return None


def _group_negation(t: Token) -> Optional[Tuple[Optional[str], str]]:
    """Split inside a parenthesised group: (positive group or None, negative group), or None."""
    if t.kind != "group" or not t.text.startswith("("):
        return None
    m = _WEIGHTED.match(t.text)
    inner, weight = (m.group("inner"), m.group("weight")) if m else (t.text[1:-1], None)
    sub = split_negations(inner)
    if not sub.changed:
        return None

    def wrap(s: str) -> str:
        return f"({s}:{weight})" if weight is not None else f"({s})"

    return (wrap(sub.positive) if sub.positive.strip() else None), wrap(sub.negative)


def _split_segment(tokens: List[Token]) -> Tuple[List[Token], List[str], bool]:
    """Remove the negations of one segment: remaining tokens, moved items, span open at the end."""
    keep = list(tokens)
    moved: List[str] = []
    open_end = False
    k = 0
    while k < len(keep):
        t = keep[k]
        if t.low in CUES:
            q = _next(keep, k + 1)
            if not _guarded(t.low, keep, q):
                items, end, reached = _span(keep, q)
                if items:
                    start = _pre_drop_start(t.low, keep, k)
                    moved.extend(items)
                    open_end = reached
                    del keep[start:end]
                    k = start
                    continue
        stem = _word_negation(t)
        if stem is not None:
            moved.append(stem)
            del keep[k]
            continue
        grouped = _group_negation(t)
        if grouped is not None:
            positive, negative = grouped
            moved.append(negative)
            if positive is None:
                del keep[k]
                continue
            keep[k] = Token("group", positive)
        if t.kind != "space":
            open_end = False
        k += 1
    return keep, moved, open_end


def _clean(tokens: Sequence[Token]) -> str:
    """Text of a segment that lost words: one space between words, no dangling joiner."""
    text = re.sub(r"[ \t]+", " ", "".join(t.text for t in tokens))
    lead = text[: len(text) - len(text.lstrip())]
    body = text.strip()
    changed = True
    while changed and body:
        changed = False
        parts = body.split(" ")
        if parts[-1].lower() in TRAILING:
            body, changed = " ".join(parts[:-1]).strip(), True
        elif parts[0].lower() in LEADING:
            body, changed = " ".join(parts[1:]).strip(), True
    return (lead[:1] if lead and body else "") + body


def _simple_list(tokens: Sequence[Token]) -> Optional[Tuple[List[str], bool]]:
    """Items of a segment made only of short noun phrases joined by and/or, and whether it closes with or/nor."""
    items: List[str] = []
    cur: List[Token] = []
    closes = False
    for t in tokens:
        if t.kind == "space":
            cur.append(t)
            continue
        if t.kind not in ("word", "group"):
            return None
        if t.low in JOINERS:
            closes = closes or t.low in ("or", "nor")
            items.append(_items_text(cur))
            cur = []
            continue
        if t.low in STOP:
            return None
        cur.append(t)
    items.append(_items_text(cur))
    if items and not items[0] and _next(tokens, 0) < len(tokens) and tokens[_next(tokens, 0)].low in JOINERS:
        items = items[1:]  # ", or glasses": the Oxford comma before the closing joiner
    items = [_strip_articles(i) for i in items]
    if not all(items) or any(len(i.split()) > 3 for i in items):
        return None
    return items, closes


def _strip_articles(item: str) -> str:
    parts = item.split()
    while parts and parts[0].lower() in ARTICLES:
        parts = parts[1:]
    return " ".join(parts)


def _continuation(segs: Sequence[List[Token]], seps: Sequence[str], i: int) -> Tuple[List[str], int]:
    """Items of comma segments after segment ``i`` that continue its negated list, and how many."""
    pending: List[str] = []
    j = i + 1
    while j < len(segs) and seps[j - 1] == ",":
        found = _simple_list(segs[j])
        if found is None:
            break
        items, closes = found
        pending.extend(items)
        if closes:
            return pending, j - i
        j += 1
    return [], 0


# ---------------------------------------------------------------------------- whole prompt


def _dedupe(items: Sequence[str]) -> List[str]:
    seen, out = set(), []
    for item in items:
        key = item.strip().lower()
        if key and key not in seen:
            seen.add(key)
            out.append(item.strip())
    return out


def split_negations(text: str) -> Split:
    """Split ``text`` into (positive, negative); text with nothing to move comes back unchanged."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    segs, seps = segments(tokenize(text))
    kept: List[Optional[str]] = []
    moved: List[str] = []
    i = 0
    while i < len(segs):
        keep, items, open_end = _split_segment(segs[i])
        if not items:
            kept.append("".join(t.text for t in segs[i]))
            i += 1
            continue
        moved.extend(items)
        kept.append(_clean(keep) or None)
        extra, used = _continuation(segs, seps, i) if open_end else ([], 0)
        moved.extend(extra)
        kept.extend([None] * used)
        i += 1 + used
    if not moved:
        return Split(text, "", ())
    return Split(_join(kept, seps), ", ".join(_dedupe(moved)), tuple(moved))


def _join(kept: Sequence[Optional[str]], seps: Sequence[str]) -> str:
    """Rejoin kept segments with the separator before each; a trailing separator of the text stays."""
    out = ""
    for idx, seg in enumerate(kept):
        if seg is None or (idx > 0 and not seg.strip() and idx == len(kept) - 1):
            continue
        out = seg.lstrip() if not out else out + seps[idx - 1] + seg
    if seps and kept[-1] is not None and not kept[-1].strip() and out:
        out += seps[-1]
    return out.strip()


def merge_negative(moved: str, extra: str) -> str:
    """The moved negations, then the extra negative text, joined by a comma when both exist."""
    parts = [p.strip() for p in (moved or "", extra or "") if p and p.strip()]
    return ", ".join(parts)
