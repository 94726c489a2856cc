"""A slow, plain reference of one sampling run's guided predictions, written from docs/internals.md
("What a step computes") and not from the engine: one branch at a time, one evaluation at a time, no batching.

It imports only the pure formulas that are checked against outside oracles elsewhere (``rules.cfg``,
``rules.apg``, ``rules.perp_neg``, ``rules.rescale`` with ``to_v``/``from_v``, ``rules.cfg_zero_star``,
``rules.dng_posterior``/``rules.dng``, ``rules.split_bands``); never the plan, the engine's combine or the
rule classes. A combination is plain data (``Combo``); the tests turn the same data into the pack's objects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from negative_guidance_pack.samplers import rules as formulas

ALWAYS = (math.inf, -math.inf)


@dataclass
class RuleDesc:
    """One rule of a nesting: ``kind`` is cfg, perp_neg, apg, rescale, cfg_zero_star, dynamic, min_sigma, interval or
    cached; ``params`` its parameters by the rule classes' names; ``inner`` the rule inside (skipping and cached)."""

    kind: str = "cfg"
    params: dict = field(default_factory=dict)
    inner: RuleDesc | None = None


@dataclass
class ExtraDesc:
    weight: float
    window: tuple = ALWAYS  # (sigma_start, sigma_end), closed
    mask: torch.Tensor | None = None  # [H, W] bools: where the conditioning reaches (None: everywhere)


@dataclass
class Combo:
    scale: float
    rule: RuleDesc = field(default_factory=RuleDesc)
    window: tuple = ALWAYS
    sampler_negative: bool = True
    uncond: bool = False
    extras: list = field(default_factory=list)
    asked: bool = False  # another node made the host predict the sampler's negative at cfg 1
    flow: bool = False


def math_dtype(t: torch.Tensor) -> torch.dtype:
    """The precision the pack's math runs in (README: float32, float64 when the input is)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def inside(window: tuple, sigma: float) -> bool:
    return not (sigma > window[0] or sigma < window[1])


def flatten(rule: RuleDesc):
    """Rules inside rules, laid flat: (skipping rules, the cached negative or None, the combiner)."""
    skipping, cache = [], None
    while rule.kind in ("min_sigma", "interval", "cached"):
        if rule.kind == "cached":
            cache = rule
        else:
            skipping.append(rule)
        rule = rule.inner if rule.inner is not None else RuleDesc()
    return skipping, cache, rule


def skips(rule: RuleDesc, sigma: float, n: int) -> bool:
    p = rule.params
    if rule.kind == "min_sigma":
        low = p.get("min_sigma", 0.0)
        return low > 0 and sigma < low and (p.get("all_steps", False) or n % 2 == 1)
    low, high = p.get("sigma_low", 0.28), p.get("sigma_high", 5.42)
    return not (low < sigma <= high)


def needs_uncond(kind: str) -> bool:
    return kind in ("perp_neg", "dynamic")


class Reference:
    """One run of ``combo``: call :meth:`evaluate` for each model evaluation, in order."""

    def __init__(self, combo: Combo):
        self.c = combo
        self.skipping, self.cache, self.combiner = flatten(combo.rule)
        self.n = 0
        self.diff, self.at, self.cover, self.lengths = {}, {}, {}, {}
        self.cadence = None  # where the cached negative's cadence starts
        self.kept = (-1, math.inf)  # the last evaluation the cached negative did not rebuild, and its sigma
        self.previous = None  # the previous evaluation's sigma
        self.running = None  # APG
        self.p, self.prev = None, None  # dynamic guidance

    # -- which branches (docs: "Which branches an evaluation has")

    def branches(self, sigma: float):
        """(status by branch, what plays the negative, the reference) for this evaluation."""
        c, n = self.c, self.n
        if self.cache is not None and self.cadence is None and n >= self.cache.params.get("full_start", 2):
            if sigma <= self.cache.params.get("from_sigma", math.inf):
                self.cadence = n
        rebuilt = self.cache is not None and self.rebuilds(sigma)
        if any(skips(r, sigma, n) for r in self.skipping):
            return {}, None, None
        active = [i for i, e in enumerate(c.extras) if e.weight != 0 and inside(e.window, sigma)]
        ref = None
        if active:
            ref = "uncond" if c.uncond else ("primary" if c.sampler_negative else "positive")
        main = not math.isclose(c.scale, 1.0)
        on = c.sampler_negative and inside(c.window, sigma)
        n_predicted = (on and (main or c.asked)) or ref == "primary"
        if on and n_predicted:
            negative = "primary"
        elif c.uncond and main and not on:
            negative = "uncond"
        else:
            negative = None
        wanted = []
        if negative == "primary" or ref == "primary":
            wanted.append("primary")
        if negative == "uncond" or ref == "uncond" or (c.uncond and needs_uncond(self.combiner.kind)):
            wanted.append("uncond")
        wanted += active
        status = {b: "predicted" for b in wanted}
        if rebuilt:
            status = {b: "rebuilt" if b in self.diff else "predicted" for b in wanted}
        return status, negative, ref

    def rebuilds(self, sigma: float) -> bool:
        """Whether the cached negative rebuilds on this evaluation, skipped or not (docs: item 6 of "Which
        branches"): between its cadence's predictions, and when adaptive only on a falling sigma within
        max_log_sigma_drop in ln sigma of the last evaluation it did not rebuild."""
        p, n = self.cache.params, self.n
        previous, self.previous = self.previous, sigma
        (m, s_m), drop = self.kept, p.get("max_log_sigma_drop", 0.3)
        due = self.cadence is None or n == self.cadence or n - max(m, self.cadence) >= p.get("every", 3)
        rebuilt = p.get("every", 3) > 1 and not due
        if rebuilt and math.isfinite(drop):
            rebuilt = previous is not None and 0 < sigma < previous and (s_m <= 0 or math.log(s_m / sigma) <= drop)
        if not rebuilt:
            self.kept = (n, sigma)
        return rebuilt

    # -- one evaluation

    def evaluate(self, x, sigma: float, sample_sigmas, predict):
        """The guided prediction at ``x``, ``sigma``; ``predict(branch)`` is the model's prediction of one branch
        ("positive", "primary", "uncond" or an extra's index). Returns (guided, the branches predicted)."""
        status, negative, ref = self.branches(sigma)
        pos = predict("positive")
        s = torch.full((x.shape[0],), sigma, dtype=x.dtype)
        values = {b: predict(b) for b, v in status.items() if v == "predicted"}
        cover = {i: (values[i] != 0).any(dim=1, keepdim=True) for i in values if isinstance(i, int)}
        if self.cache is not None:
            for b, v in status.items():
                if v == "rebuilt":
                    values[b] = self.rebuild(b, pos, s)
                    if isinstance(b, int):
                        cover[b] = self.cover[b]
                else:
                    self.remember(b, pos, values[b], s)
                    if isinstance(b, int):
                        self.cover[b] = cover[b]
        D = {"positive": pos, **values}
        extras = [i for i in status if isinstance(i, int)]
        d_ref = D[ref] if extras else None
        for i in extras:
            D[i] = torch.where(cover[i], D[i], d_ref)
        out = self.combine(x, s, sample_sigmas, D, negative, extras, d_ref)
        self.n += 1
        return out, sorted((b for b, v in status.items() if v == "predicted"), key=str)

    def unit(self, pos, s):
        """sigma ** sigma_power per sample: sigma in noise space, 1 in denoised space."""
        hi = math_dtype(pos)
        return s.to(hi).reshape(-1, *[1] * (pos.ndim - 1)) ** self.cache.params.get("sigma_power", 0.5)

    def remember(self, b, pos, value, s):
        hi = math_dtype(pos)
        d = (pos.to(hi) - value.to(hi)) / self.unit(pos, s)
        p = self.cache.params
        self.diff[b] = formulas.split_bands(d, p.get("cutoff", 0.25)) if p.get("bands", False) else d
        self.at[b] = self.n
        measured = [float(v) for v in (pos.to(hi) - value.to(hi)).flatten(1).norm(dim=1)]
        self.lengths[b] = (self.lengths.get(b, [None])[-1:] + [measured])[-2:]

    def rebuild(self, b, pos, s):
        p = self.cache.params
        j = self.n - self.at[b]
        if p.get("bands", False):
            low, high = self.diff[b]
            d = low * p.get("growth", 1.0) ** j + high * p.get("high_growth", 1.0) ** j
        else:
            d = self.diff[b] * p.get("growth", 1.0) ** j
        hi = math_dtype(pos)
        d = self.unit(pos, s) * d  # D_pos - D_b
        if p.get("bounded", True):
            known = [x for x in self.lengths[b] if x is not None]
            rows = []
            for i in range(d.shape[0]):
                longest, length = max(k[i] for k in known), float(d[i].norm())
                rows.append(d[i] * (longest / length) if length > longest else d[i])
            d = torch.stack(rows)
        return (pos.to(hi) - d).to(pos.dtype)

    # -- the combine (docs: "The combine")

    def nots(self, D, extras, d_ref):
        total = 0
        for i in extras:
            total = total + self.c.extras[i].weight * (D[i] - d_ref)
        return total

    def combine(self, x, s, sample_sigmas, D, negative, extras, d_ref):
        kind, p, c = self.combiner.kind, self.combiner.params, self.c
        pos = D["positive"]
        neg = D[negative] if negative is not None else None
        nots = self.nots(D, extras, d_ref)
        if kind == "cfg":
            return (pos if neg is None else formulas.cfg(pos, neg, c.scale)) - nots
        if kind == "perp_neg":
            if "uncond" not in D:
                return pos - nots
            negs = ([neg] if neg is not None else []) + [D[i] for i in extras]
            weights = ([c.scale * p.get("neg_scale", 1.0)] if neg is not None else []) + [c.extras[i].weight
                                                                                           for i in extras]
            return formulas.perp_neg(pos, D["uncond"], negs, weights, c.scale)
        if kind == "apg":
            if neg is None:
                return pos - nots
            out, self.running = formulas.apg(pos, neg, c.scale, p.get("eta", 0.0), p.get("norm_threshold", 15.0),
                                             p.get("momentum", -0.5), self.running)
            return out - nots
        if kind == "rescale":
            if neg is None and not extras:
                return pos
            guided = (pos if neg is None else formulas.cfg(pos, neg, c.scale)) - nots
            phi = p.get("phi", 0.7)
            if c.flow:
                return x - formulas.rescale(x - guided, x - pos, phi)
            v = formulas.rescale(formulas.to_v(x, guided, s), formulas.to_v(x, pos, s), phi)
            return formulas.from_v(x, v, s)
        if kind == "cfg_zero_star":
            main = pos if neg is None else x - formulas.cfg_zero_star(x - pos, x - neg, c.scale)
            out = main - nots
            k = p.get("zero_init_steps", 1)
            if k > 0 and sample_sigmas is not None and len(sample_sigmas) >= 2:
                last = float(sample_sigmas[min(k, len(sample_sigmas) - 1) - 1])
                if float(s[0]) >= last:
                    return x.clone()
            return out
        if kind == "dynamic":
            base = pos if "uncond" not in D else formulas.cfg(pos, D["uncond"], c.scale)
            if negative != "primary":
                self.prev = None
                return base - nots
            if self.p is None:
                self.p = torch.full((x.shape[0],), p.get("prior", 0.01), dtype=torch.float32)
            if self.prev is not None:
                xp, sp, bp, np_ = self.prev
                self.p = formulas.dng_posterior(self.p, x, s, xp, sp, bp, np_, p.get("temperature", 1.0),
                                                p.get("offset", 0.0), p.get("p_min", 1e-6), p.get("p_max", 0.99),
                                                flow=c.flow)
            self.prev = (x.clone(), s, base, neg)
            return formulas.dng(base, neg, self.p, p.get("scale", 20.0)) - nots
        raise ValueError(f"unknown combiner {kind}")
