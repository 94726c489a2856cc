"""A model with known truth: an analytic denoiser for a labelled 2-D mixture of Gaussians.

The "images" are points in the plane. Each concept is a Gaussian component; a prompt is a
weighted set of components, and its data distribution is their mixture. For a mixture
``p(x0) = sum_k pi_k N(mu_k, s_k^2 I)`` and the noisy point ``x = x0 + sigma * eps``, the exact
clean-image prediction (Tweedie) is

    D(x; sigma) = E[x0 | x] = sum_k r_k(x) * (mu_k + s_k^2 / (s_k^2 + sigma^2) * (x - mu_k)),
    r_k(x) ∝ pi_k N(x; mu_k, (s_k^2 + sigma^2) I),

so every guidance rule can be run on a model whose answer is known. "A man without mustache"
is modelled the way a text encoder fails: its conditioning covers "man" *and* "mustache", with
more weight on the mustache than "man" alone has. Sampling runs the pack's real engine and rules
(``engine.GuidanceSpec`` / ``combine_step``, the functions the ComfyUI nodes call) with
k-diffusion's Euler and Heun samplers (Karras et al. 2022, Algorithms 1-2) on a Karras schedule.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import engine, rules
from .checks import choice
from .schedule import SigmaWindow

COMPONENTS: dict[str, tuple] = {
    # name: (mean, std)
    "man": ((-1.6, 1.1), 0.45),
    "man with mustache": ((-1.6, -1.1), 0.45),
    "woman": ((1.6, 1.1), 0.45),
    "cat": ((1.8, -1.4), 0.45),
}

PROMPTS: dict[str, dict[str, float]] = {
    "": {name: 1.0 for name in COMPONENTS},  # the empty prompt: everything
    "man": {"man": 1.0, "man with mustache": 1.0},
    "man without mustache": {"man": 1.0, "man with mustache": 3.0},  # the encoder binds man + mustache
    "mustache": {"man with mustache": 1.0},
    "cat": {"cat": 1.0},  # an unrelated negative
    "man with mustache, man": {"man": 1.0, "man with mustache": 2.0},  # a negative overlapping the positive
    "man, clean-shaven": {"man": 1.0},  # the true target p(x | man, not mustache)
}

SIGMA_MIN, SIGMA_MAX = 0.02, 20.0

IMAGE_SIZE, IMAGE_STD = 24, 0.1


def image_template(concept: str, size: int = IMAGE_SIZE, width: int | None = None) -> torch.Tensor:
    """A [3, size, width] toy picture in [-1, 1] for a concept: a face, the same face with a mustache,
    a face with long hair, a cat's head. Only the mustache differs between the first two."""
    width = width or size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, width), indexing="ij")
    img = torch.full((3, size, width), -0.6)
    face = (xx ** 2 + (yy / 1.15) ** 2) < 0.62
    skin = torch.tensor([0.8, 0.45, 0.2])
    img[:, face] = skin[:, None]
    for ex in (-0.3, 0.3):  # eyes
        img[:, ((xx - ex) ** 2 + (yy + 0.22) ** 2) < 0.012] = -0.9
    if concept == "man with mustache":
        # the skin's colour negated: as far from zero as the skin, so a sampler that starts from zero-mean
        # noise (as every ComfyUI sampler does) is not drawn to either, at any picture size
        img[:, mustache_band(size, width)] = -skin[:, None]
    elif concept == "woman":
        hair = ((xx.abs() > 0.55) & (xx.abs() < 0.85) & (yy > -0.6)) | ((yy < -0.55) & face.logical_not() & (xx.abs() < 0.85))
        img[:, hair] = torch.tensor([0.2, -0.3, -0.7])[:, None]
    elif concept == "cat":
        for ex in (-0.45, 0.45):  # ears
            img[:, ((yy + 0.75 - (xx - ex).abs() * 1.2) > 0) & (yy < -0.45) & ((xx - ex).abs() < 0.3)] = skin[:, None]
        img[:, (yy > 0.22) & (yy < 0.26) & (xx.abs() > 0.2) & (xx.abs() < 0.75)] = -0.9  # whiskers
    return img


def mustache_band(size: int, width: int | None = None) -> torch.Tensor:
    """The [size, width] mask of the pixels a mustache covers (between nose and mouth)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, width or size), indexing="ij")
    return (yy > 0.2) & (yy < 0.34) & (xx.abs() < 0.38)


def has_mustache(images: torch.Tensor) -> torch.Tensor:
    """Whether each decoded picture (``[B, H, W, 3]`` in [0, 1], as ComfyUI's IMAGE) shows a mustache:
    its mustache band is dark (the face's skin there otherwise)."""
    band = mustache_band(images.shape[1], images.shape[2]).to(images.device)
    luminance = images[..., :3].float().mean(dim=-1)  # [B, H, W]
    return luminance[:, band].mean(dim=1) < 0.4


# ---------------------------------------------------------------------------- the toy text encoder

CONCEPTS = tuple(COMPONENTS)  # the order of the concept weights an encoded word carries
# word -> weights over CONCEPTS. "without", "no", "not" are not words it knows: a text encoder that
# binds "man" and "mustache" and drops the negation, as real encoders do.
VOCABULARY: dict[str, tuple] = {
    "man": (1.0, 1.0, 0.0, 0.0), "men": (1.0, 1.0, 0.0, 0.0), "guy": (1.0, 1.0, 0.0, 0.0),
    "mustache": (0.0, 2.0, 0.0, 0.0), "moustache": (0.0, 2.0, 0.0, 0.0), "mustaches": (0.0, 2.0, 0.0, 0.0),
    "beard": (0.0, 2.0, 0.0, 0.0),
    "clean-shaven": (0.0, -1.0, 0.0, 0.0), "shaven": (0.0, -1.0, 0.0, 0.0),
    "woman": (0.0, 0.0, 1.0, 0.0), "women": (0.0, 0.0, 1.0, 0.0), "girl": (0.0, 0.0, 1.0, 0.0),
    "cat": (0.0, 0.0, 0.0, 1.0), "cats": (0.0, 0.0, 0.0, 1.0), "kitten": (0.0, 0.0, 0.0, 1.0),
}
EVERYTHING = (1.0, 1.0, 1.0, 1.0)  # the start token: what a prompt without a known word means
START_KEY = -30.0  # its attention logit; a known word's is 0, so any known word outweighs it


def words(text: str) -> list:
    """The known words of a prompt, in order (lower case; punctuation splits)."""
    cleaned = "".join(c.lower() if c.isalnum() or c == "-" else " " for c in text)
    return [w for w in cleaned.split() if w in VOCABULARY]


def picture_denoise(x: torch.Tensor, sigma: torch.Tensor, weights: torch.Tensor, templates: torch.Tensor,
                    std: float = IMAGE_STD, halves: bool = False) -> torch.Tensor:
    """Exact ``E[x0 | x]`` for pictures: each row of ``x`` ([B, 3, H, W], noise level ``sigma`` [B]) under
    its own mixture of the ``templates`` ([K, 3, H, W]) with ``weights`` [B, K] (need not sum to 1).

    With ``halves`` the left and right halves of a picture are independent mixtures (a model with
    local receptive fields, where a negative masked to one half leaves the other alone)."""
    if halves:
        cut = x.shape[-1] // 2
        return torch.cat([picture_denoise(x[..., :cut], sigma, weights, templates[..., :cut], std),
                          picture_denoise(x[..., cut:], sigma, weights, templates[..., cut:], std)], dim=-1)
    flat, means = x.double().flatten(1), templates.double().flatten(1)
    s2 = sigma.double().reshape(-1, 1) ** 2
    var = std ** 2 + s2  # [B, 1]
    d2 = torch.cdist(flat, means) ** 2  # [B, K]
    log_r = torch.log(weights.double().clamp_min(1e-12)) - d2 / (2 * var)
    r = torch.softmax(log_r, dim=1)
    shrink = std ** 2 / var
    mean = r @ means  # [B, D]
    return (mean + shrink * (flat - mean)).reshape(x.shape).to(x.dtype)


@dataclass(frozen=True)
class Mixture:
    """A Gaussian mixture in the plane with its exact denoiser."""

    means: torch.Tensor  # [K, 2]
    stds: torch.Tensor  # [K]
    weights: torch.Tensor  # [K], sums to 1
    names: tuple = ()

    @classmethod
    def for_prompt(cls, prompt: str, dtype=torch.float64, images: bool = False) -> Mixture:
        """The prompt's mixture over points in the plane, or (``images``) over the toy images."""
        if prompt not in PROMPTS:
            raise KeyError(f"unknown toy prompt {prompt!r}; known: {sorted(PROMPTS)}")
        parts = PROMPTS[prompt]
        names = tuple(parts)
        if images:
            means = torch.stack([image_template(n).flatten() for n in names]).to(dtype)
            stds = torch.full((len(names),), IMAGE_STD, dtype=dtype)
        else:
            means = torch.tensor([COMPONENTS[n][0] for n in names], dtype=dtype)
            stds = torch.tensor([COMPONENTS[n][1] for n in names], dtype=dtype)
        w = torch.tensor([parts[n] for n in names], dtype=dtype)
        return cls(means, stds, w / w.sum(), names)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Exact ``E[x0 | x]`` at noise level ``sigma`` (a float or a per-point tensor); ``x`` is [N, D]."""
        x64 = x.to(self.means.dtype)
        s = torch.as_tensor(sigma, dtype=x64.dtype, device=x64.device).reshape(-1, 1)
        var = self.stds.to(x64.device) ** 2 + s ** 2  # [N or 1, K]
        diff = x64[:, None, :] - self.means.to(x64.device)[None]  # [N, K, D]
        dim = x64.shape[-1]
        log_r = self.weights.to(x64.device).log() - (diff ** 2).sum(-1) / (2 * var) - 0.5 * dim * torch.log(var)
        r = torch.softmax(log_r, dim=1)  # the D-dimensional normal's normaliser is var^(-D/2)
        shrink = self.stds.to(x64.device) ** 2 / var  # [N or 1, K]
        means = self.means.to(x64.device)[None] + shrink[..., None] * diff
        return (r[..., None] * means).sum(1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return self.means[k] + noise * self.stds[k, None]

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)


def component_of(x: torch.Tensor) -> list:
    """The most likely concept of each clean point (equal priors): how a sample is labelled."""
    names = list(COMPONENTS)
    means = torch.tensor([COMPONENTS[n][0] for n in names], dtype=x.dtype)
    stds = torch.tensor([COMPONENTS[n][1] for n in names], dtype=x.dtype)
    d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    log_p = -d2 / (2 * stds ** 2) - 2 * torch.log(stds)
    return [names[i] for i in log_p.argmax(1).tolist()]


def picture_of(x: torch.Tensor) -> list:
    """The concept of each toy picture (flattened ``[3, IMAGE_SIZE, IMAGE_SIZE]``): its nearest template."""
    names = list(COMPONENTS)
    templates = torch.stack([image_template(n).flatten() for n in names]).to(x.dtype)
    return [names[i] for i in torch.cdist(x, templates).argmin(1).tolist()]


def share_in(x: torch.Tensor, concept: str) -> float:
    labels = picture_of(x) if x.shape[-1] == 3 * IMAGE_SIZE * IMAGE_SIZE else component_of(x)
    return sum(label == concept for label in labels) / max(len(labels), 1)


COMPONENT_STD = 0.45  # every concept's spread in the plane
OFF_DATA = 4.0  # a point farther than this many stds from every concept lies off the data


def distance_from(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean distance of each sample from the reference sample drawn from the same seed, in concept stds:
    how far a cheaper setting's samples land from those of the setting it stands in for."""
    return float((x.double() - reference.double()).norm(dim=1).mean()) / COMPONENT_STD


def share_off_data(x: torch.Tensor) -> float:
    """The share of samples farther than ``OFF_DATA`` stds from every concept: samples that left the data.
    (A sample pushed far past every concept is not a clean-shaven man; the share alone would count it so.)"""
    means = torch.tensor([m for m, _ in COMPONENTS.values()], dtype=torch.float64)
    stds = torch.tensor([s for _, s in COMPONENTS.values()], dtype=torch.float64)
    z = (x.double()[:, None, :] - means[None]).norm(dim=-1) / stds
    return float((z.min(dim=1).values > OFF_DATA).double().mean())


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance (Rabin et al. 2011) between two equal-size point sets."""
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(projections, generator=gen, dtype=torch.float64) * math.pi
    dirs = torch.stack([angles.cos(), angles.sin()], 1)
    pa = (a.double() @ dirs.T).sort(0).values
    pb = (b.double() @ dirs.T).sort(0).values
    return float((pa - pb).abs().mean())


def karras_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0) -> list:
    """Karras et al. (2022) eq. 5, with the final 0 appended as k-diffusion does."""
    ramp = [i / max(steps - 1, 1) for i in range(steps)]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in ramp] + [0.0]


def percent_to_sigma(percent: float, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> float:
    """Schedule percent to sigma, log-linear between the ends as the host's EDM model sampling does."""
    if percent <= 0.0:
        return math.inf
    if percent >= 1.0:
        return -math.inf
    return math.exp(math.log(sigma_max) * (1 - percent) + math.log(sigma_min) * percent)


def window(start_percent: float = 0.0, end_percent: float = 1.0) -> SigmaWindow:
    return SigmaWindow(percent_to_sigma(start_percent), percent_to_sigma(end_percent))


@dataclass
class ToyRun:
    """What to sample: prompts, scale, rule, windows; and what it cost."""

    positive: str = "man"
    negative: str = ""
    cfg: float = 5.0
    rule: rules.Rule = field(default_factory=rules.CFG)
    primary_window: SigmaWindow = field(default_factory=SigmaWindow)
    extras: tuple = ()  # ((prompt, weight, SigmaWindow), ...)
    unconditional: str | None = None
    branches: int = 0
    evaluations: int = 0

    def spec(self) -> engine.GuidanceSpec:
        return engine.GuidanceSpec(
            primary_window=self.primary_window,
            extras=tuple(engine.ExtraNegative(w, win) for _, w, win in self.extras),
            has_uncond=self.unconditional is not None,
            rule=self.rule,
        )


def guided_denoiser(run: ToyRun, sample_sigmas: torch.Tensor, images: bool = False, trace=None) -> Callable:
    """A k-diffusion-style model ``D(x, sigma)`` that plans, predicts and combines like the nodes do."""
    spec, state = run.spec(), run.rule.new_state()
    mix = lambda prompt: Mixture.for_prompt(prompt, images=images)  # noqa: E731
    pos_m, neg_m = mix(run.positive), mix(run.negative)
    unc_m = mix(run.unconditional) if run.unconditional is not None else None
    extra_m = [mix(p) for p, _, _ in run.extras]
    as_image = (lambda t: t.reshape(t.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE)) if images else (lambda t: t)  # noqa: E731

    def model(x: torch.Tensor, sigma: float) -> torch.Tensor:
        plan = spec.plan(sigma, scale=run.cfg, call_index=run.evaluations, state=state)
        run.evaluations += 1
        run.branches += plan.branches
        sigmas = torch.full((x.shape[0],), sigma, dtype=x.dtype)
        pos = pos_m.denoise(x, sigma)
        models = {"primary": neg_m, "uncond": unc_m, **dict(enumerate(extra_m))}
        made = {k: as_image(models[k].denoise(x, sigma)) for k in plan.having("predicted")}
        primary, uncond, extras = spec.complete(plan, state, as_image(pos), sigmas, made, run.evaluations - 1)
        flat = lambda t: None if t is None else t.reshape(x.shape)  # noqa: E731
        primary, uncond, extras = flat(primary), flat(uncond), [flat(e) for e in extras]
        out = engine.combine_step(
            spec, plan, state, scale=run.cfg, pos=pos, primary=primary, uncond=uncond, extras=extras,
            x=x, sigma=sigmas, sample_sigmas=sample_sigmas,
        )
        if trace is not None:
            neg = None if plan.negative == "positive" else engine.negative_for(plan, pos, primary, uncond)
            trace.record(as_image(x), torch.tensor([sigma]), as_image(pos), None if neg is None else as_image(neg),
                         as_image(out), negative=plan.negative, extras=len(plan.extras))
        return out

    return model


SAMPLERS = ("euler", "heun", "euler_ancestral")


def sample(run: ToyRun, n: int = 2000, steps: int = 30, sampler: str = "euler", seed: int = 0,
           images: bool = False, trace=None) -> torch.Tensor:
    """Draw ``n`` points with k-diffusion's Euler, Heun (Karras et al. 2022, Alg. 1-2) or Euler
    ancestral sampler (eta 1, as k-diffusion's ``sample_euler_ancestral``). With ``images`` the
    samples are toy pictures (flattened [3, IMAGE_SIZE, IMAGE_SIZE]); a ``trace.Trace`` records
    every evaluation as the ComfyUI nodes do."""
    choice("sampler", sampler, SAMPLERS)
    sigmas = karras_sigmas(steps)
    gen = torch.Generator().manual_seed(seed)
    dim = 3 * IMAGE_SIZE * IMAGE_SIZE if images else 2
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) * sigmas[0]
    model = guided_denoiser(run, torch.tensor(sigmas, dtype=torch.float64), images=images, trace=trace)
    for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
        d = (x - model(x, sigma)) / sigma
        if sampler == "euler_ancestral":
            up = math.sqrt(nxt ** 2 * (sigma ** 2 - nxt ** 2) / sigma ** 2) if nxt > 0 else 0.0
            down = math.sqrt(nxt ** 2 - up ** 2)
            x = x + d * (down - sigma) + torch.randn(x.shape, generator=gen, dtype=x.dtype) * up
            continue
        x_next = x + d * (nxt - sigma)
        if sampler == "heun" and nxt > 0:
            d2 = (x_next - model(x_next, nxt)) / nxt
            x_next = x + (d + d2) / 2 * (nxt - sigma)
        x = x_next
    return x
