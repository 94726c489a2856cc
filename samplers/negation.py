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
- a segment is scanned for the cues ``without``, ``no``, ``not``, ``never``, ``lacking``,
  ``sans``, ``minus``, ``except`` (``except for``), ``excluding``, ``other than``, ``free of``
  and ``devoid of`` (whole words, any case). The negated span runs from the cue to the next stop
  word (a preposition, a participle such as ``wearing``/``holding``, a relative pronoun, another
  cue) or the end of the segment; ``and``, ``or`` and ``nor`` inside it split it into items.
  Leading articles and ``wearing``/``with`` style fillers are dropped from each item ("not
  wearing a hat" -> "hat");
- a double negation affirms: ``not``/``never`` before ``without``, ``lacking``, ``sans``,
  ``free of`` or ``devoid of`` drops both cues and leaves what follows in the positive ("a soldier
  not without courage" -> "a soldier courage");
- a span that reaches the end of its segment continues over following comma segments only when
  the list closes with ``or``/``nor`` ("without mustache, beard or glasses"); with ``and`` the
  comma ends it, because "without hat, blue shirt and jeans" is as common as a negated list;
- words ``non-X`` and ``X-free`` move ``X`` ("a sugar-free cake" -> "a cake" / "sugar");
- a weighted group whose text holds a negation is split inside and keeps its weight on both
  sides: "(man without hat:1.2)" -> "(man:1.2)" / "(hat:1.2)"; groups nested deeper than
  ``MAX_DEPTH`` are left as written;
- left untouched: a cue with nothing to negate ("yes or no"), "no" before a possessive or a number
  ("no man's sky", "No 5"), fixed phrases ("no one", "no longer", "not only", "not just", "never
  mind", "free of charge", "sans serif"), an exception after "nothing"/"none"/"no one" ("nothing
  except a hat", "none other than the king": that *is* the thing), lexicalised
  ``non-``/``-free`` words (``non-stop``, ``non-fiction``, ``hands-free``, ``duty-free``), hyphenated
  words (``never-ending``, ``sans-serif``) and words that merely contain a cue ("nothing",
  "Nobody", "knot", "notebook", "snow", "none", "nonsense", "no-fly zone").

Text with no negation comes back unchanged, byte for byte. Every step is linear in the length of
the text, whatever its brackets, quotes, escapes or weights; ``check``, when given, is called every
few thousand tokens so a host can interrupt a long run.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

MAX_DEPTH = 8
CHECK_EVERY = 4096
# One-word cues, and the two-word cues by their first word (the key is the cue's name).
SINGLE_CUES = frozenset({"without", "no", "not", "never", "lacking", "sans", "minus", "except", "excluding"})
PAIR_CUES = {("except", "for"): "except", ("other", "than"): "other than", ("free", "of"): "free of",
             ("devoid", "of"): "devoid of"}
CUE_WORDS = SINGLE_CUES | {first for first, _ in PAIR_CUES}
# "not without courage": the first cue turns the second into an affirmation.
DOUBLE_FIRST = frozenset({"not", "never"})
DOUBLE_SECOND = frozenset({"without", "lacking", "sans", "free of", "devoid of"})
# An exception after these names the only thing there is ("nothing except a hat").
EXCEPTIONS = frozenset({"except", "excluding", "other than", "minus"})
ONLY_BEFORE = frozenset({"nothing", "none", "one", "nobody"})
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
}) | SINGLE_CUES | PARTICIPLES
ARTICLES = frozenset({"a", "an", "the", "any", "some", "single"})
# Dropped at the start of the first item only ("not wearing a hat" -> "hat").
CONNECTIVES = frozenset({"wearing", "having", "holding", "showing", "containing", "with", "include", "including"})
NOT_GUARDED = CONNECTIVES | PARTICIPLES
# The next word after the cue that makes it a fixed phrase, not a negation to move.
GUARDS = {
    "no": frozenset({"one", "longer", "matter", "doubt", "way", "more", "less", "sooner", "wonder"}),
    "not": frozenset({"only", "just", "even", "quite", "yet", "really", "that", "so", "much", "too",
                      "very", "all", "always", "necessarily", "sure"}),
    "never": frozenset({"mind", "again", "before", "ever", "once", "forget", "only", "just", "really", "too"}),
    "without": frozenset({"doubt"}),
    "sans": frozenset({"serif"}),
    "free of": frozenset({"charge", "cost"}),
}
# Words removed with the cue when they stand just before it ("a man with no hat" -> "a man").
_BE = frozenset({"is", "are", "was", "were"})
_RELATIVES = frozenset({"who", "that", "which"})
PRE_DROP = {
    "no": (frozenset({"with", "has", "have", "having"}), _RELATIVES),
    "not": (_BE | {"be", "being", "do", "does"}, _RELATIVES),
    "never": (_BE | {"has", "have", "had", "does", "do"}, _RELATIVES),
    "without": (_BE, _RELATIVES),
    "lacking": (_BE, _RELATIVES),
    "free of": (_BE, _RELATIVES),
    "devoid of": (_BE, _RELATIVES),
}
NO_PRE_DROP = (frozenset(), frozenset())
PRE_JOINERS = frozenset({"and", "or", "but"})
# Dangling words trimmed from the ends of a segment that lost a negation.
TRAILING = frozenset({"and", "or", "nor", "but", "with", "of", "who", "that", "which", "is", "are", "&"})
LEADING = frozenset({"and", "or", "nor", "but", "&"})
# Lexicalised words that are not negations of a visible thing.
NON_KEEP = frozenset({"stop", "fiction", "binary", "profit", "stick", "slip", "sense", "existent",
                      "descript", "chalant", "toxic", "negotiable", "verbal", "zero", "linear", "euclidean"})
FREE_KEEP = frozenset({"hands", "duty", "tax", "toll", "fancy", "scot", "care", "royalty", "rent", "fee",
                       "interest", "risk", "cruelty", "hassle", "worry", "stress", "trouble", "lock"})

_NON = re.compile(r"^non-(.+)$", re.IGNORECASE | re.DOTALL)
_FREE = re.compile(r"^(.+)-free$", re.IGNORECASE | re.DOTALL)
_WEIGHT = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*")
_MAYBE = re.compile(r"-|(?<!\w)(?:" + "|".join(sorted(CUE_WORDS)) + r")(?!\w)",
                    re.IGNORECASE)
_NUMBER = re.compile(r"^[#\d]")
_SPACES = re.compile(r"[ \t]+")
_WHITESPACE = re.compile(r"\s+")
_OPEN = {"(": ")", "[": "]", "{": "}"}

Check = Callable[[], None] | None


class Token(NamedTuple):
    """One piece of a prompt; ``low`` is a word's lower case ("" for anything else). Inside the
    splitter tokens are plain tuples of these four fields, read by index."""

    kind: str  # word, group, quote, space, sep, punct
    text: str
    low: str = ""
    start: int = -1  # where a group starts in the text it was read from


@dataclass(frozen=True)
class Split:
    """The result: what stays positive, what moves to the negative, each moved item, and the cue
    words of double negations dropped from the positive."""

    positive: str
    negative: str
    moved: tuple[str, ...] = field(default_factory=tuple)
    dropped: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changed(self) -> bool:
        return bool(self.moved or self.dropped)


# ---------------------------------------------------------------------------- lexing


_BRACKETS = re.compile(r'\\[\s\S]?|\(+|\[+|\{+|[)\]}]|"[^"]*"|"')
_OPENER_RUN = re.compile(r'\(+|\[+|\{+')


class _Groups:
    """Where each bracket group of one text ends, each scan's answer remembered.

    A group opening at ``i`` is balanced when a scan from ``i`` (escapes skip a character, a
    quote jumps to its closing quote, a closer other than the innermost open one is text) closes
    it. A scan from an outer opener passes every opener inside it exactly as a scan from that
    opener would, so one scan answers for all of them, and the groups inside a group are read
    from the same answers: no character is scanned twice.
    """

    def __init__(self, text: str):
        self.text = text
        self.ends: dict[int, int | None] = {}
        self.last = {closer: text.rfind(closer) for closer in _OPEN.values()}

    def end(self, i: int) -> int | None:
        """End (exclusive) of the balanced group opening at ``text[i]``, or None when unbalanced."""
        if i not in self.ends:
            if self.last[_OPEN[self.text[i]]] < i:
                return None  # no closer of its kind after it
            self._scan(i)
        return self.ends[i]

    def _scan(self, i: int) -> None:
        """Scan from ``i``: the stack holds runs of one opener as [closer, first position, count]."""
        ends, text = self.ends, self.text
        first = _OPENER_RUN.match(text, i)
        stack = [[_OPEN[text[i]], i, first.end() - i]]
        for m in _BRACKETS.finditer(text, first.end()):
            c = m.group()
            if c[0] in _OPEN:
                stack.append([_OPEN[c[0]], m.start(), len(c)])
            elif c == stack[-1][0]:
                top = stack[-1]
                top[2] -= 1
                ends[top[1] + top[2]] = m.end()  # the run's innermost open bracket closes
                if not top[2]:
                    stack.pop()
                    if not stack:
                        return
            elif c == '"':
                break  # a quote that never closes
        for _, start, count in stack:
            ends.update(dict.fromkeys(range(start, start + count)))


# Plain text (no bracket or quote) cut into separators, runs of spaces and words: escapes take the
# next character, a period ends a word only before whitespace or the end of the text, and a word
# ends at a space, tab, newline, separator, bracket or quote. ``_PLAIN_MID`` reads a stretch that a
# bracket or quote follows, so a period at its end is part of a word.
_PLAIN_END = re.compile(r'([,;\n]|\.(?=\s|\Z))|([^\S\n]+)|((?:\\[\s\S]?|\.(?!\s|\Z)|[^ \t\r\n,;"()\[\]{}\\.])+)')
_PLAIN_MID = re.compile(r'([,;\n]|\.(?=\s))|([^\S\n]+)|((?:\\[\s\S]?|\.(?!\s)|[^ \t\r\n,;"()\[\]{}\\.])+)')
# Where plain text stops: brackets and quotes, escapes stepped over.
_SPECIAL = re.compile(r'\\[\s\S]?|([()\[\]{}"]+)')


_SPACE = ("space", " ", "", -1)  # the commonest token, made once


def _plain(text: str, a: int, b: int, hi: int) -> list[Token]:
    found = (_PLAIN_END if b == hi else _PLAIN_MID).findall(text, a, b)
    return [("word", w, w.lower(), -1) if w else _SPACE if sp == " " else ("space", sp, "", -1) if sp
            else ("sep", sep, "", -1) for sep, sp, w in found]


def tokenize(text: str) -> list[Token]:
    """Cut a prompt into words, atomic groups/quotes, spaces, separators and other punctuation."""
    return [Token(*t) for t in _tokens(text)]


def _tokens(text: str, check: Check = None, lo: int = 0, hi: int | None = None,
            groups: _Groups | None = None) -> list[tuple]:
    """:func:`tokenize` of ``text[lo:hi]`` as plain tuples (kind, text, low, start), which cost a
    fraction of a named tuple's time to make.

    ``groups`` carries the bracket answers of the whole text, when the range lies inside a group of it.
    """
    hi = len(text) if hi is None else hi
    groups = groups or _Groups(text)
    out: list[tuple] = []
    i = lo
    while i < hi:
        if check is not None:
            check()
        for m in _SPECIAL.finditer(text, i, hi):
            if m.group(1) is None:
                continue  # an escape
            start, stop = m.span()
            if start > i:
                out += _plain(text, i, start, hi)
            i = _specials(text, start, stop, hi, groups, out)
            if i != stop:
                break  # the run's last group or quote reaches beyond it: read on from its end
        else:
            out += _plain(text, i, hi, hi)
            break
    return out


def _specials(text: str, start: int, stop: int, hi: int, groups: _Groups, out: list[tuple]) -> int:
    """Read a run of brackets and quotes: the groups and quotes it opens, and each stretch of
    unbalanced ones as one punctuation token. Returns where reading goes on (past ``stop`` when
    the last group reaches beyond the run)."""
    j = punct = start
    while j < stop:
        c = text[j]
        end = groups.end(j) if c in _OPEN else (text.find('"', j + 1, hi) + 1 or None) if c == '"' else None
        if end is None or end > hi:
            j += 1
            continue
        if j > punct:
            out.append(("punct", text[punct:j], "", -1))
        out.append(("group" if c in _OPEN else "quote", text[j:end], "", j))
        j = punct = end
    if punct < stop:
        out.append(("punct", text[punct:stop], "", -1))
    return max(j, stop)


def segments(tokens: Sequence[Token]) -> tuple[list[list[Token]], list[str]]:
    """Tokens between separators, and the separators (one fewer than the segments)."""
    segs: list[list[Token]] = [[]]
    seps: list[str] = []
    for t in tokens:
        if t[0] == "sep":
            seps.append(t[1])
            segs.append([])
        else:
            segs[-1].append(t)
    return segs, seps


# ---------------------------------------------------------------------------- one segment


def _next(tokens: Sequence[tuple], k: int) -> int:
    """Index of the next non-space token at or after ``k`` (len(tokens) when none). Two spaces never
    stand side by side in a segment as read, so one step is enough."""
    return k + 1 if k < len(tokens) and tokens[k][0] == "space" else k


def _prev(tokens: Sequence[Token], k: int) -> int:
    """Index of the previous non-space token before ``k`` (-1 when none)."""
    k -= 1
    while k >= 0 and tokens[k][0] == "space":
        k -= 1
    return k


# A cue found in a segment: (its name, its first word's index, the index after its last word).
Cue = tuple[str, int, int]


def _cue_at(tokens: Sequence[Token], k: int, before: Sequence[Token] = ()) -> Cue | None:
    """The cue whose first word is ``tokens[k]``, if any; ``before`` is the kept text before it."""
    low = tokens[k][2]
    if low not in CUE_WORDS:
        return None
    name, end = None, k + 1
    q = _next(tokens, k + 1)
    if q < len(tokens) and (low, tokens[q][2]) in PAIR_CUES:
        name, end = PAIR_CUES[(low, tokens[q][2])], q + 1
    elif low in SINGLE_CUES:
        name = low
    if name in EXCEPTIONS:
        p = _prev(before, len(before))
        if p >= 0 and before[p][2] in ONLY_BEFORE:
            return None
    return None if name is None else (name, k, end)


def _guarded(cue: str, tokens: Sequence[Token], q: int) -> bool:
    """True when the cue at hand is a fixed phrase ("no one", "without a doubt") or has nothing to negate."""
    while q < len(tokens) and tokens[q][2] in ARTICLES and _next(tokens, q + 1) < len(tokens):
        q = _next(tokens, q + 1)
    if q >= len(tokens) or tokens[q][0] in ("punct", "quote"):
        return True
    t = tokens[q]
    if t[0] != "word":
        return False
    low = t[2]
    return (low in GUARDS.get(cue, ()) or low in JOINERS or low.endswith(("'s", "\u2019s", "'", "\u2019"))
            or bool(_NUMBER.match(low)) or (low in STOP and low not in NOT_GUARDED)
            or _cue_at(tokens, q) is not None)


def _items_text(item: Sequence[Token]) -> str:
    return _WHITESPACE.sub(" ", "".join(t[1] for t in item)).strip()


def _span(tokens: Sequence[Token], q: int) -> tuple[list[str], int, bool]:
    """Items negated from ``q`` on, the end index of the span, and whether it reached the segment end."""
    items: list[list[Token]] = []
    cur: list[Token] = []
    first, expecting, k = True, True, q
    while k < len(tokens):
        t = tokens[k]
        if t[0] == "space":
            if cur:
                cur.append(t)
            k += 1
            continue
        if t[0] == "punct":
            break
        if t[0] in ("group", "quote"):
            cur.append(t)
            expecting = False
            k += 1
            continue
        low = t[2]
        if expecting and (low in ARTICLES or (first and low in CONNECTIVES)):
            k += 1
            continue
        if low in JOINERS and cur:
            after = _next(tokens, k + 1)
            nxt = tokens[after][2] if after < len(tokens) else ""
            # "not wearing a hat or holding a sword": "or" carries the negation over a participle.
            carried = low in ("or", "nor") and nxt in NOT_GUARDED
            if not carried and (after >= len(tokens) or tokens[after][0] == "punct" or nxt in STOP
                                or _cue_at(tokens, after) is not None):
                k = after if after >= len(tokens) else k + 1  # drop the joiner with the span
                break
            items.append(cur)
            cur, first, expecting = [], carried, True
            k += 1
            continue
        if (low in STOP or low in JOINERS or _cue_at(tokens, k) is not None) and (
                cur or not (first and low in PARTICIPLES)):
            break
        cur.append(t)
        expecting = False
        k += 1
    if cur:
        items.append(cur)
    texts = [s for s in (_items_text(i) for i in items) if s]
    reached_end = _next(tokens, k) >= len(tokens)
    return texts, k, reached_end


def _pre_drop_start(cue: str, kept: Sequence[Token]) -> int:
    """How much of the kept text before a cue goes with it: "with", "who is", a joiner..."""
    verbs, relatives = PRE_DROP.get(cue, NO_PRE_DROP)
    start = len(kept)
    for group in (verbs, relatives, PRE_JOINERS):
        k = _prev(kept, start)
        if k >= 0 and kept[k][2] in group:
            start = k
    return start


def _word_negation(t: Token) -> str | None:
    """The moved stem of a ``non-X`` or ``X-free`` word, or None."""
    if t[0] != "word" or "-" not in t[1]:
        return None
    m = _NON.match(t[1])
    if m and m.group(1).lower() not in NON_KEEP and m.group(1)[:1].isalpha():
        return m.group(1)
    m = _FREE.match(t[1])
    if m and m.group(1).lower() not in FREE_KEEP and m.group(1)[:1].isalnum():
        return m.group(1)
    return None


def _inner_end(group: str) -> tuple[int, str | None]:
    """Where the inside of a ``(...)`` group ends, and its weight (after the last colon, as the host reads it)."""
    colon = group.rfind(":", 1, len(group) - 1)
    if colon > 0:
        m = _WEIGHT.fullmatch(group, colon + 1, len(group) - 1)
        if m:
            return colon, m.group().strip()
    return len(group) - 1, None


def _group_negation(t: Token, ctx: _Context) -> tuple[str | None, str, tuple[str, ...]] | None:
    """Split inside a parenthesised group: (positive group or None, negative group, dropped cues), or None."""
    if t[0] != "group" or not t[1].startswith("(") or ctx.depth >= MAX_DEPTH:
        return None
    end, weight = _inner_end(t[1])
    if not _MAYBE.search(t[1], 1, end):
        return None  # no cue word, no hyphen: nothing inside can move
    sub = _split(ctx.inside(t[3] + 1, t[3] + end))
    if not sub.changed:
        return None

    def wrap(s: str) -> str:
        return f"({s}:{weight})" if weight is not None else f"({s})"

    negative = wrap(sub.negative) if sub.moved else ""
    return (wrap(sub.positive) if sub.positive.strip() else None), negative, sub.dropped


@dataclass
class _Segment:
    """What splitting one segment gives: the kept tokens, the moved items, the dropped cue words,
    and whether a negated span was still open at its end."""

    kept: list[Token] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    open_end: bool = False


def _double_negation(tokens: Sequence[Token], cue: Cue) -> Cue | None:
    """The second cue of "not without X" (with X after it), or None."""
    if cue[0] not in DOUBLE_FIRST:
        return None
    q = _next(tokens, cue[2])
    second = _cue_at(tokens, q) if q < len(tokens) else None
    if second is None or second[0] not in DOUBLE_SECOND:
        return None
    x = _next(tokens, second[2])
    return second if x < len(tokens) and tokens[x][0] in ("word", "group") else None


def _split_segment(tokens: list[tuple], ctx: _Context) -> _Segment:
    """Remove the negations of one segment, reading left to right. Only the tokens that may start
    a negation (a cue word, a hyphenated word, a parenthesised group) are looked at one by one;
    the runs between them are kept whole, and kept tokens are only appended or cut from the end,
    so a segment of any length costs time linear in it."""
    seg = _Segment()
    hot = [k for k, t in enumerate(tokens)
           if t[2] in CUE_WORDS or (t[0] == "word" and "-" in t[1]) or (t[0] == "group" and t[1][0] == "(")]
    hot.append(len(tokens))
    k = 0
    for n, h in enumerate(hot):
        if h < k:
            continue
        if h > k:
            seg.kept.extend(tokens[k:h])
            if h - k > 1 or tokens[k][0] != "space":  # two spaces never stand side by side
                seg.open_end = False
        if h == len(tokens):
            break
        if ctx.check is not None and n % CHECK_EVERY == 0:
            ctx.check()
        k = _at_hot_token(tokens, h, seg, ctx)
    return seg


def _at_hot_token(tokens: list[tuple], k: int, seg: _Segment, ctx: _Context) -> int:
    """Read the token at ``k``, which may start a negation; return where reading goes on."""
    t, kept = tokens[k], seg.kept
    cue = _cue_at(tokens, k, kept)
    if cue is not None:
        second = _double_negation(tokens, cue)
        if second is not None:
            seg.dropped.append(_items_text(tokens[cue[1]:second[2]]))
            return _next(tokens, second[2])
        q, affirmed = _next(tokens, cue[2]), []
        while q < len(tokens) and (inner := _cue_at(tokens, q)) and (second := _double_negation(tokens, inner)):
            affirmed.append(_items_text(tokens[inner[1]:second[2]]))  # "not not without hat": "not hat"
            q = _next(tokens, second[2])
        if not _guarded(cue[0], tokens, q):
            items, end, reached = _span(tokens, q)
            if items:
                del kept[_pre_drop_start(cue[0], kept):]
                seg.dropped.extend(affirmed)
                seg.moved.extend(items)
                seg.open_end = reached
                return end
    if t[0] == "word":
        stem = _word_negation(t)
        if stem is not None:
            seg.moved.append(stem)
            return k + 1
        kept.append(t)
        seg.open_end = False
        return k + 1
    grouped = _group_negation(t, ctx)
    if grouped is not None:
        positive, negative, dropped = grouped
        seg.dropped.extend(dropped)
        if negative:
            seg.moved.append(negative)
        if positive is None:
            return k + 1
        t = ("group", positive, "", -1)
    kept.append(t)
    seg.open_end = False
    return k + 1


def _clean(tokens: Sequence[Token]) -> str:
    """Text of a segment that lost words: one space between words, no dangling joiner."""
    text = _SPACES.sub(" ", "".join(t[1] for t in tokens))
    lead = text[: len(text) - len(text.lstrip())]
    parts = text.strip().split(" ")
    lo, hi = 0, len(parts)
    while lo < hi:
        if parts[hi - 1].lower() in TRAILING:
            hi -= 1
        elif parts[lo].lower() in LEADING:
            lo += 1
        else:
            break
    body = " ".join(parts[lo:hi]).strip()
    return (lead[:1] if lead and body else "") + body


def _simple_list(tokens: Sequence[Token]) -> tuple[list[str], bool] | None:
    """Items of a segment made only of short noun phrases joined by and/or, and whether it closes with or/nor."""
    items: list[str] = []
    cur: list[Token] = []
    closes = False
    for k, t in enumerate(tokens):
        if t[0] == "space":
            cur.append(t)
            continue
        if t[0] not in ("word", "group"):
            return None
        if t[2] in JOINERS:
            closes = closes or t[2] in ("or", "nor")
            items.append(_items_text(cur))
            cur = []
            continue
        if t[2] in STOP or _cue_at(tokens, k) is not None:
            return None
        cur.append(t)
    items.append(_items_text(cur))
    if items and not items[0] and _next(tokens, 0) < len(tokens) and tokens[_next(tokens, 0)][2] in JOINERS:
        items = items[1:]  # ", or glasses": the Oxford comma before the closing joiner
    items = [_strip_articles(i) for i in items]
    if not all(items) or any(len(i.split()) > 3 for i in items):
        return None
    return items, closes


def _strip_articles(item: str) -> str:
    parts = item.split()
    lo = 0
    while lo < len(parts) and parts[lo].lower() in ARTICLES:
        lo += 1
    return " ".join(parts[lo:])


def _continuation(segs: Sequence[list[Token]], seps: Sequence[str], i: int) -> tuple[list[str], int]:
    """Items of comma segments after segment ``i`` that continue its negated list, and how many."""
    pending: list[str] = []
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


def _dedupe(items: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for item in items:
        key = item.strip().lower()
        if key and key not in seen:
            seen.add(key)
            out.append(item.strip())
    return out


def split_negations(text: str, check: Check = None) -> Split:
    """Split ``text`` into (positive, negative); text with nothing to move comes back unchanged.

    ``check`` (e.g. the host's interrupt test) is called every few thousand tokens and may raise.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    return _split(_Context(text, 0, len(text), _Groups(text), 0, check))


@dataclass(frozen=True)
class _Context:
    """Where a split reads: a range of one text, the text's bracket answers, the group depth."""

    text: str
    lo: int
    hi: int
    groups: _Groups
    depth: int
    check: Check

    def inside(self, lo: int, hi: int) -> _Context:
        return _Context(self.text, lo, hi, self.groups, self.depth + 1, self.check)


def _split(ctx: _Context) -> Split:
    segs, seps = segments(_tokens(ctx.text, ctx.check, ctx.lo, ctx.hi, ctx.groups))
    kept: list[str | None] = []
    moved: list[str] = []
    dropped: list[str] = []
    i = 0
    while i < len(segs):
        seg = _split_segment(segs[i], ctx)
        dropped.extend(seg.dropped)
        if not seg.moved:
            kept.append("".join(t[1] for t in (seg.kept if seg.dropped else segs[i])))
            i += 1
            continue
        moved.extend(seg.moved)
        kept.append(_clean(seg.kept) or None)
        extra, used = _continuation(segs, seps, i) if seg.open_end else ([], 0)
        moved.extend(extra)
        kept.extend([None] * used)
        i += 1 + used
    if not moved and not dropped:
        return Split(ctx.text[ctx.lo:ctx.hi], "", ())
    return Split(_join(kept, seps), ", ".join(_dedupe(moved)), tuple(moved), tuple(dropped))


def _join(kept: Sequence[str | None], seps: Sequence[str]) -> str:
    """Rejoin kept segments with the separator before each; a trailing separator of the text stays."""
    out: list[str] = []
    written = False  # whether the text so far has a character
    for idx, seg in enumerate(kept):
        if seg is None or (idx > 0 and not seg.strip() and idx == len(kept) - 1):
            continue
        if written:
            out += [seps[idx - 1], seg]
        else:
            out = [seg.lstrip()]
            written = bool(out[0])
    if seps and kept[-1] is not None and not kept[-1].strip() and written:
        out.append(seps[-1])
    return "".join(out).strip()


def merge_negative(moved: str, extra: str) -> str:
    """The moved negations, then the extra negative text, joined by a comma when both exist."""
    parts = [p.strip() for p in (moved or "", extra or "") if p and p.strip()]
    return ", ".join(parts)
