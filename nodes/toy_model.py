"""NegativeGuidanceToyModel: a MODEL, CLIP and VAE with known truth, built on the host's own classes.

- **MODEL**: a ``comfy.model_base.BaseModel`` (x0 prediction, the host's discrete schedule) whose
  diffusion model predicts the exact clean picture, ``E[x0 | x]``, of a mixture of four toy pictures
  (a face, the face with a mustache, a woman, a cat; ``samplers/toy.py``) at the latent's size. The
  mixture's weights come from the text through one attention call the host's attention override
  reaches, so Negative Attention Guidance acts on it like on any cross-attention model.
- **CLIP**: a ``comfy.sd.CLIP`` whose encoder reads words the way real encoders fail: "man" and
  "mustache" are bound, "without" is dropped (``samplers/toy.VOCABULARY``); weights like
  ``(mustache:1.2)`` are parsed by the host's own prompt-weight parser.
- **VAE**: the host's pixel-space VAE: the latent is the picture itself (3 channels, no downscale),
  so ``EmptyLatentImage`` at 512x512 gives 64x64 pictures.
"""
from __future__ import annotations

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import torch
from comfy.ldm.modules.attention import optimized_attention
from comfy_api.latest import io

from ..samplers import toy
from .guidance import CATEGORY
from .validation import InputError

NODE = "NegativeGuidanceToyModel"
WIDTH = 1 + len(toy.CONCEPTS)  # an encoded word: its attention key, then its weight on each concept


class ToyPictures(comfy.latent_formats.LatentFormat):
    """The latent is the picture in [-1, 1]: three channels, no scaling."""

    latent_channels = 3
    latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]

    def __init__(self):
        self.scale_factor = 1.0


class ToyDenoiser(torch.nn.Module):
    """The exact mixture denoiser of the toy pictures for the conditioning it is given.

    The text's concept weights are pooled by one attention call (a single query over the text's
    tokens, through the host's ``optimized_attention``, so attention overrides see it); the
    prediction is then ``E[x0 | x]`` under that mixture at the call's sigma.
    """

    def __init__(self, halves=False, device=None, dtype=None, operations=None, **kwargs):
        super().__init__()
        self.halves = halves
        self.register_buffer("query", torch.zeros(1, 1, WIDTH), persistent=False)
        self.query[..., 0] = WIDTH ** 0.5  # q . k / sqrt(d) is the key channel: a known word 0, the start token -30
        self.dtype = torch.float32
        self._templates = {}
        self.sigma_of = None  # set by ToyBaseModel: the host's timestep -> sigma of this model

    def templates(self, h: int, w: int, device) -> torch.Tensor:
        key = (h, w, device)
        if key not in self._templates:
            self._templates[key] = torch.stack([toy.image_template(c, h, w) for c in toy.CONCEPTS]).to(device)
        return self._templates[key]

    def concept_weights(self, context: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        q = self.query.to(context).expand(context.shape[0], -1, -1)
        pooled = optimized_attention(q, context, context, 1, transformer_options=transformer_options)
        return pooled[:, 0, 1:].clamp_min(0.0)

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):
        sigmas = transformer_options.get("sigmas")  # one per latent sample; a batched call tiles the latent batch
        if sigmas is not None and x.shape[0] % sigmas.shape[0] == 0:
            sigma = sigmas.to(x).repeat(x.shape[0] // sigmas.shape[0])
        else:
            sigma = self.sigma_of(timesteps).to(x)
        weights = self.concept_weights(context.to(x.dtype), transformer_options)
        return toy.picture_denoise(x, sigma, weights, self.templates(x.shape[-2], x.shape[-1], x.device),
                                   halves=self.halves)


class ToyConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}
    latent_format = ToyPictures
    memory_usage_factor = 0.01
    # The SD schedule's shape, out to sigma 420 instead of 14.6: samplers start from zero-mean noise, which is
    # the marginal at sigma_max only while sigma_max dwarfs the distance between two pictures (about 20 at 64x64).
    sampling_settings = {"linear_end": 0.03}
    supported_inference_dtypes = [torch.float32]

    def get_model(self, state_dict=None, prefix="", device=None):
        return ToyBaseModel(self, device=device)


class ToyBaseModel(comfy.model_base.BaseModel):
    """x0 prediction on the picture itself (the host's IMG_TO_IMG type: no input scaling)."""

    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.IMG_TO_IMG, device=device, unet_model=ToyDenoiser)
        self.diffusion_model.sigma_of = self.model_sampling.sigma

    def get_dtype(self):
        return torch.float32


# ---------------------------------------------------------------------------- the text encoder


class ToyTokenizer:
    """Words to token ids with their prompt weights (the host's parser reads ``(word:1.2)``)."""

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        self.ids = {word: i + 1 for i, word in enumerate(toy.VOCABULARY)}

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        pairs = [(0, 1.0)]  # the start token
        for part, weight in comfy.sd1_clip.token_weights(comfy.sd1_clip.escape_important(text), 1.0):
            pairs += [(self.ids[w], weight) for w in toy.words(comfy.sd1_clip.unescape_important(part))]
        if return_word_ids:
            pairs = [(t, w, i) for i, (t, w) in enumerate(pairs)]
        return {"toy": [pairs]}

    def untokenize(self, token_weight_pair):
        words = {i: w for w, i in self.ids.items()}
        return [(p, words.get(p[0], "<start>")) for p in token_weight_pair]

    def state_dict(self):
        return {}


class ToyTextEncoder(torch.nn.Module):
    """Token ids to the toy embedding: an attention key and the word's concept weights, times its weight."""

    def __init__(self, device=None, dtype=None, model_options={}, **kwargs):
        super().__init__()
        table = torch.zeros(1 + len(toy.VOCABULARY), WIDTH)
        table[0, 0], table[0, 1:] = toy.START_KEY, torch.tensor(toy.EVERYTHING)
        for i, weights in enumerate(toy.VOCABULARY.values()):
            table[i + 1, 1:] = torch.tensor(weights)
        self.register_buffer("table", table)
        self.dtypes = {torch.float32}

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def encode_token_weights(self, token_weight_pairs):
        pairs = token_weight_pairs["toy"][0]
        ids = torch.tensor([p[0] for p in pairs])
        weights = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
        embedding = self.table[ids].clone()
        embedding[:, 1:] *= weights[:, None]
        return embedding[None], None

    def load_sd(self, sd):
        return [], []


# ---------------------------------------------------------------------------- the node


def toy_model(halves: bool = False):
    """(MODEL, CLIP, VAE) of the toy pictures, all from the host's own classes, no weights."""
    config = ToyConfig({"halves": bool(halves)})
    device = comfy.model_management.get_torch_device()
    model = comfy.model_patcher.ModelPatcher(config.get_model(), load_device=device,
                                             offload_device=comfy.model_management.unet_offload_device())
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(ToyTokenizer, ToyTextEncoder))
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    return model, clip, vae


class NegativeGuidanceToyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Toy model with known truth (Negative Guidance)",
            category=CATEGORY,
            description="A model whose answer is known: its pictures are a face, the same face with a mustache, a woman "
            "and a cat, and it predicts the exact clean picture for the prompt. Its text encoder binds 'man' and "
            "'mustache' and drops 'without', as real encoders do: 'portrait of a man' gives men with and without a "
            "mustache, 'a man without mustache' more mustaches, and the negative 'mustache' removes them. Known "
            "words: " + ", ".join(toy.VOCABULARY) + ". Connect EmptyLatentImage for the picture size (512x512 "
            "gives 64x64 pictures).",
            inputs=[io.Boolean.Input("independent_halves", default=False, optional=True,
                                     tooltip="Make the left and right halves of a picture independent, as in a model "
                                     "whose receptive fields are local: a negative masked to one half then leaves the "
                                     "other half alone (half mustaches appear). Off: each picture is one whole.")],
            outputs=[io.Model.Output(tooltip="The toy model: every sampler, scheduler and node works on it."),
                     io.Clip.Output(tooltip="The toy text encoder (CLIPTextEncode)."),
                     io.Vae.Output(tooltip="The host's pixel-space VAE: the latent is the picture.")],
        )

    @classmethod
    def execute(cls, independent_halves=False) -> io.NodeOutput:
        if not isinstance(independent_halves, bool):
            raise InputError(NODE, "independent_halves", "must be true or false", repr(independent_halves))
        return io.NodeOutput(*toy_model(independent_halves))


NODES = [NegativeGuidanceToyModel]
