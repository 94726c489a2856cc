"""How NAG reaches each model family's attention, through the host's own mechanisms only.

The pack never replaces a forward. For each model call it extends the call's inputs in an
``APPLY_MODEL`` wrapper and routes every attention call of that forward through
``transformer_options["optimized_attention_override"]`` (see ``nodes/nag.py``). What "extend" means
depends on the family:

the negative's tokens ride in the positive's rows, appended to its text. Every operation on text
tokens in these models is per token except attention, and attention is where the pack splits the two
texts again, so no latent row is added: a cross-attention model (UNets, Wan, LTXV) pays one extra
cross-attention per layer; a joint-attention model (Flux, Chroma, SD3, HiDream, HunyuanVideo,
Qwen-Image, Lumina2) pays the negative's text tokens through its blocks and the attention of the image
over the negative text. Where a model reads the text other than per token (HunyuanVideo's mean over
the text, Qwen-Image's and Lumina2's positions by token index), the adapter keeps what the positive
would read alone.

Each adapter also names what the family needs of the negative, and how many image tokens a call has.
"""
from __future__ import annotations

import importlib
import math
import weakref
from dataclasses import dataclass

import torch

from ..samplers.nag import Layout


class Unsupported(Exception):
    """This model or this call cannot be guided; the message says why."""


@dataclass
class Prepared:
    """A model call's inputs with the negative in them, and what the attention override needs."""

    x: torch.Tensor
    t: torch.Tensor
    c_concat: torch.Tensor | None
    context: torch.Tensor
    control: dict | None
    kwargs: dict
    layout: Layout
    realign: tuple | None = None       # (rotary table, "positive" or "negative"): the text a joint call moves


def _patches(size: int, patch: int) -> int:
    return -(-size // patch)


def _expand_rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A negative's batch made ``batch`` rows, as the host's ``repeat_to_batch_size`` does."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    return t.repeat(math.ceil(batch / t.shape[0]), *([1] * (t.ndim - 1)))[:batch]


class Adapter:
    """One family: how its calls carry the negative, and where its attention sees the texts."""

    name = "?"
    kind = "joint"           # "joint" (text and image in one attention) or "cross"
    text_first = True
    identify_cross_by_patch = False   # UNets: the attn2 patch marks each cross-attention call
    text_refiner = False              # the model also attends over its text alone (a token refiner)
    negative_keys: tuple = ()         # conditioning keys the negative must carry besides its tensor

    def context_width(self, dm) -> int | None:
        return None

    def check_model(self, dm) -> None:
        """Raise :class:`Unsupported` for a model of this family NAG cannot guide."""

    def image_tokens(self, dm, x: torch.Tensor, kwargs: dict) -> int:
        return 0

    def check_call(self, kwargs: dict) -> None:
        """Raise :class:`Unsupported` for a call NAG cannot guide (a mask it cannot split, say)."""

    def prepare(self, dm, x, t, c_concat, context, control, kwargs, negative, rows):
        self.check_call(kwargs)
        neg = _expand_rows(negative.tensor(context), context.shape[0])
        image = self.image_tokens(dm, x, kwargs)
        repeat = self._repeat(context.shape[1], neg.shape[1], image, kwargs)
        if repeat > 1:
            neg = neg.repeat(1, repeat, 1)
        kwargs = self.extend_kwargs(kwargs, negative, context.shape[0], repeat)
        layout = Layout(self.segments(context.shape[1], neg.shape[1], kwargs, negative, repeat), image, self.text_first)
        return Prepared(x, t, c_concat, torch.cat([context, neg], dim=1), control, kwargs, layout)

    def segments(self, pos: int, neg: int, kwargs: dict, negative, repeat: int) -> tuple:
        return ((pos, neg),)

    def extend_kwargs(self, kwargs: dict, negative, batch: int, repeat: int) -> dict:
        return kwargs

    def _repeat(self, pos: int, neg: int, image: int, kwargs: dict) -> int:
        """Cross-attention models: repeat the negative's tokens (which leaves its attention unchanged)
        until the text's token count differs from every other key count in the call, so the
        override can tell the calls apart by shape."""
        if self.kind != "cross" or self.identify_cross_by_patch:
            return 1
        taken = {image} | set(self.other_key_counts(kwargs))
        repeat = 1
        while pos + repeat * neg in taken:
            repeat += 1
        return repeat

    def other_key_counts(self, kwargs: dict) -> tuple:
        return ()


# ---------------------------------------------------------------------------- cross-attention families


class UNet(Adapter):
    name, kind, identify_cross_by_patch = "UNet (SD1.x, SD2.x, SDXL)", "cross", True

    def check_model(self, dm):
        from comfy.ldm.modules.attention import BasicTransformerBlock

        for module in dm.modules():
            if isinstance(module, BasicTransformerBlock) and module.disable_self_attn:
                raise Unsupported("its first attention layers attend to the text as well (disable_self_attn), "
                                  "which the attn2 patches NAG uses do not mark")


class Wan(Adapter):
    name, kind = "Wan 2.1/2.2", "cross"

    def context_width(self, dm):
        return dm.text_embedding[0].in_features

    def image_tokens(self, dm, x, kwargs):
        tokens = math.prod(_patches(s, p) for s, p in zip(x.shape[2:], dm.patch_size))
        ref = kwargs.get("reference_latent")
        if ref is not None:
            tokens += math.prod(_patches(s, p) for s, p in zip(ref.shape[-2:], dm.patch_size[1:]))
        extra = kwargs.get("time_dim_concat")
        if extra is not None:
            tokens += math.prod(_patches(s, p) for s, p in zip(extra.shape[2:], dm.patch_size))
        return tokens

    def other_key_counts(self, kwargs):
        clip = kwargs.get("clip_fea")
        return () if clip is None else (int(clip.shape[1]),)


class LTXV(Adapter):
    name, kind = "LTXV", "cross"
    negative_keys = ()

    def context_width(self, dm):
        return dm.caption_projection.linear_1.in_features

    def image_tokens(self, dm, x, kwargs):
        return math.prod(x.shape[2:])

    def extend_kwargs(self, kwargs, negative, batch, repeat):
        mask = kwargs.get("attention_mask")
        if mask is None:
            return kwargs
        neg = negative.extra("attention_mask", like=mask, tokens=negative.tokens)
        neg = _expand_rows(neg, batch).repeat(1, repeat)
        return dict(kwargs, attention_mask=torch.cat([mask, neg.to(mask)], dim=1))


class ToyPictures(Adapter):
    """The pack's toy model: one query (the picture) attends over the text's tokens."""

    name, kind = "toy pictures", "cross"

    def context_width(self, dm):
        from .toy_model import WIDTH

        return WIDTH

    def image_tokens(self, dm, x, kwargs):
        return 1


# ---------------------------------------------------------------------------- joint-attention families


class Flux(Adapter):
    name = "Flux (dev, schnell, Kontext)"

    def context_width(self, dm):
        return dm.txt_in.in_features

    def image_tokens(self, dm, x, kwargs):
        p = dm.patch_size
        tokens = _patches(x.shape[-2], p) * _patches(x.shape[-1], p)
        for ref in kwargs.get("ref_latents") or ():
            tokens += _patches(ref.shape[-2], p) * _patches(ref.shape[-1], p)
        return tokens

    def check_call(self, kwargs):
        if kwargs.get("attention_mask") is not None:
            raise Unsupported("the positive carries an attention mask over text and image (a style model's "
                              "strength mask), which NAG cannot split between two texts")


class Chroma(Flux):
    name = "Chroma"


class SD3(Adapter):
    name = "SD3/SD3.5"

    def context_width(self, dm):
        return dm.context_embedder.in_features if dm.context_embedder is not None else None

    def check_model(self, dm):
        if getattr(dm, "register_length", 0):
            raise Unsupported("its learned register tokens would be shared by both texts")
        if getattr(dm, "context_processor", None) is not None:
            raise Unsupported("its context processor attends over the text without the host's attention hooks")

    def image_tokens(self, dm, x, kwargs):
        p = dm.patch_size
        return _patches(x.shape[-2], p) * _patches(x.shape[-1], p)


class HiDream(Adapter):
    name, text_first = "HiDream", False
    negative_keys = ("conditioning_llama3",)

    def context_width(self, dm):
        return dm.caption_projection[-1].linear.in_features

    def image_tokens(self, dm, x, kwargs):
        p = dm.patch_size
        width = x.shape[-1] + (kwargs["image_cond"].shape[-1] if kwargs.get("image_cond") is not None else 0)
        return _patches(x.shape[-2], p) * _patches(width, p)

    def extend_kwargs(self, kwargs, negative, batch, repeat):
        llama = kwargs["encoder_hidden_states_llama3"]
        neg = _expand_rows(negative.extra("conditioning_llama3", like=llama), batch)
        return dict(kwargs, encoder_hidden_states_llama3=torch.cat([llama, neg.to(llama)], dim=2))

    def segments(self, pos, neg, kwargs, negative, repeat):
        llama = kwargs["encoder_hidden_states_llama3"].shape[2]
        neg_llama = negative.extra_tokens("conditioning_llama3")
        return ((pos, neg), (llama - neg_llama, neg_llama), (llama - neg_llama, neg_llama))


# ---------------------------------------------------------------------------- text placed by position


class HunyuanVideo(Adapter):
    """HunyuanVideo: its token refiner conditions every text token on the mean of all of them, so one
    more token follows the negative's, chosen so the mean stays the positive's; no attention sees it.
    The negative's tokens are refined with the positive's mean, as they are modulated with its pooled
    vector."""

    name, text_first, text_refiner = "HunyuanVideo", False, True

    def context_width(self, dm):
        return dm.txt_in.input_embedder.in_features

    def check_call(self, kwargs):
        if kwargs.get("attention_mask") is not None:
            raise Unsupported("the prompt carries a text mask, which the token refiner averages over unmasked")
        if kwargs.get("txt_byt5") is not None:
            raise Unsupported("the prompt carries ByT5 glyph tokens (HunyuanImage), which NAG does not split")

    def image_tokens(self, dm, x, kwargs):
        patch = dm.patch_size[-(x.ndim - 2):]  # HunyuanImage 2.1 runs the same model on 4-D latents
        tokens = math.prod(_patches(s, p) for s, p in zip(x.shape[2:], patch))
        ref = kwargs.get("ref_latent")
        if ref is not None:
            tokens += math.prod(_patches(s, p) for s, p in zip(ref.shape[2:], dm.patch_size[-(ref.ndim - 2):]))
        return tokens

    def prepare(self, dm, x, t, c_concat, context, control, kwargs, negative, rows):
        p = super().prepare(dm, x, t, c_concat, context, control, kwargs, negative, rows)
        pos, neg = context.shape[1], p.context.shape[1] - context.shape[1]
        # keep sum / count: (pos * m + sum(neg) + z) / (pos + neg + 1) == m  for z = (neg + 1) * m - sum(neg)
        mean = context.sum(dim=1, keepdim=True) / pos
        keeper = mean * (neg + 1) - p.context[:, pos:].sum(dim=1, keepdim=True)
        p.context = torch.cat([p.context, keeper], dim=1)
        p.layout = Layout(((pos, neg, 1),), p.layout.image, self.text_first)
        return p


class QwenImage(Adapter):
    """Qwen-Image numbers its text tokens on from the image's size: the negative, appended, is moved back
    to the positions it would have alone before each joint attention."""

    name = "Qwen-Image"

    def context_width(self, dm):
        return dm.txt_in.in_features

    def image_tokens(self, dm, x, kwargs):
        p = dm.patch_size
        tokens = _patches(x.shape[-2], p) * _patches(x.shape[-1], p)
        for ref in kwargs.get("ref_latents") or ():
            tokens += _patches(ref.shape[-2], p) * _patches(ref.shape[-1], p)
        return tokens

    def prepare(self, dm, x, t, c_concat, context, control, kwargs, negative, rows):
        p = super().prepare(dm, x, t, c_concat, context, control, kwargs, negative, rows)
        p.realign = (_rotation(dm.pe_embedder, -context.shape[1], (True, True, True), x.device), "negative")
        return p


class Lumina2(Adapter):
    """Lumina 2 puts its image right after the caption, so an appended negative moves the image: the
    positive's caption is moved by the negative's length too, which keeps its distances to the image;
    the negative's own distances come out right as they are."""

    name, text_refiner = "Lumina2", True

    def context_width(self, dm):
        return dm.cap_embedder[1].in_features

    def check_call(self, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and bool((mask == 0).any()):
            raise Unsupported("the prompt carries a caption mask with padding, which NAG does not re-pad")

    def image_tokens(self, dm, x, kwargs):
        p = dm.patch_size
        return _patches(x.shape[-2], p) * _patches(x.shape[-1], p)

    def prepare(self, dm, x, t, c_concat, context, control, kwargs, negative, rows):
        kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        p = super().prepare(dm, x, t, c_concat, context, control, kwargs, negative, rows)
        p.kwargs["num_tokens"] = p.context.shape[1]
        shift = p.context.shape[1] - context.shape[1]
        p.realign = (_rotation(dm.rope_embedder, shift, (True, False, False), x.device), "positive")
        return p


_ROTATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rotation(embedder, offset: int, axes: tuple, device) -> torch.Tensor:
    """The model's own rotary table for moving a token by ``offset`` along the given axes: ``[d/2, 2, 2]``
    (made once per model, offset and device, so a step makes no host-to-device copy)."""
    tables = _ROTATIONS.setdefault(embedder, {})
    key = (offset, axes, device)
    if key not in tables:
        ids = torch.tensor([[[offset if on else 0 for on in axes]]], device=device)
        tables[key] = embedder(ids).reshape(-1, 2, 2)
    return tables[key]


NOT_REACHED = "its attention is called without the host's transformer options, so no attention override reaches it"
NOT_BUILT = ("its attention does reach the host's attention override, but NAG has no adapter yet for where this "
             "family puts its text")
REFUSED = {
    # by the class of the diffusion model, checked before the families above (some subclass them)
    "WanModel_S2V": "its audio cross-attention has key counts NAG would have to tell apart from the text's; not built yet",
    "HumoWanModel": "its audio cross-attention has key counts NAG would have to tell apart from the text's; not built yet",
    "AnimateWanModel": "its face-adapter attention is not one NAG knows; not built yet",
    "ChromaRadiance": "it works on pixels, not the latent patches NAG counts; not built yet",
    "PixArtMS": NOT_REACHED,
    "HunYuanDiT": NOT_REACHED,
    "MMDiT": NOT_BUILT,  # AuraFlow (SD3's MMDiT is checked first by its own class)
    "GeneralDIT": NOT_BUILT,
    "MiniTrainDIT": NOT_BUILT,
    "AsymmDiTJoint": NOT_BUILT,
    "OmniGen2Transformer2DModel": NOT_BUILT,
    "StageC": NOT_BUILT,
    "StageB": NOT_BUILT,
    "AudioDiffusionTransformer": "it makes audio; NAG here guides image and video models",
    "ACEStepTransformer2DModel": "it makes audio; NAG here guides image and video models",
}


def refusal(dm) -> str | None:
    """Why NAG cannot guide this diffusion model, for the families it refuses by name."""
    return REFUSED.get(type(dm).__name__)


FAMILY_CLASSES = (
    # (module, class, adapter), in the order they are tried: some families subclass others (Chroma, Flux)
    ("comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel", UNet),
    ("comfy.ldm.wan.model", "WanModel", Wan),
    ("comfy.ldm.lightricks.model", "LTXVModel", LTXV),
    ("comfy.ldm.chroma.model", "Chroma", Chroma),
    ("comfy.ldm.flux.model", "Flux", Flux),
    ("comfy.ldm.modules.diffusionmodules.mmdit", "MMDiT", SD3),
    ("comfy.ldm.hidream.model", "HiDreamImageTransformer2DModel", HiDream),
    ("comfy.ldm.hunyuan_video.model", "HunyuanVideo", HunyuanVideo),
    ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel", QwenImage),
    ("comfy.ldm.lumina.model", "NextDiT", Lumina2),
)


def _host_class(module: str, name: str):
    """A family's model class, or None where this host has no such module or class (one family alone is lost)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def adapter_for(dm) -> Adapter | None:
    """The adapter of a diffusion model, or None for a family NAG does not know; a model of a family whose module
    this host lacks is refused by name."""
    from .toy_model import ToyDenoiser

    if isinstance(dm, ToyDenoiser):
        return ToyPictures()
    for module, name, adapter in FAMILY_CLASSES:
        cls = _host_class(module, name)
        if cls is None:
            if any(c.__name__ == name for c in type(dm).__mro__):
                raise Unsupported(f"NAG's {adapter.name} adapter needs {module}.{name}, which this ComfyUI does not "
                                  "have (moved or renamed in this release)")
            continue
        if isinstance(dm, cls):
            return adapter()
    return None
