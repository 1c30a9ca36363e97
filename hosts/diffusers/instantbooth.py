"""The diffusers host: InstantBooth on a diffusers ``UNet2DConditionModel`` and text encoder.

The adapters go between self- and cross-attention of every ``BasicTransformerBlock`` through forward hooks (a
pre-hook on the block keeps its input, a hook on ``attn1`` adds the adapter's gated residual), so the UNet's modules
and weights are never touched and ``remove()`` restores bit-identical outputs."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from ...backend.identifier import find_identifier_rows, inject_concept
from ...backend.instantbooth import AdapterLayout, Concept, InstantBooth, timestep_window
from ...backend.preprocess import prepare_concept_images
from ...backend.regions import check_mask, token_mask

log = logging.getLogger(__name__)


def transformer_blocks(unet) -> list[tuple[object, int, int]]:
    """(BasicTransformerBlock, level, transformer number) for every block, in execution order."""
    out = []
    n_levels = len(unet.down_blocks)
    stages = [(b, i) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        stages.append((unet.mid_block, n_levels - 1))
    stages += [(b, n_levels - 1 - j) for j, b in enumerate(unet.up_blocks)]
    t = 0
    for stage, level in stages:
        for transformer in getattr(stage, "attentions", None) or []:
            for block in transformer.transformer_blocks:
                out.append((block, level, t))
            t += 1
    return out


def adapter_layout(unet) -> AdapterLayout:
    """The adapter layout of a UNet, read from its modules (widths and heads from the blocks themselves)."""
    blocks = transformer_blocks(unet)
    if not blocks:
        raise ValueError("this UNet has no transformer blocks; InstantBooth needs a UNet with cross-attention blocks")
    depths: list[int] = []
    for _, _, t in blocks:
        if t == len(depths):
            depths.append(0)
        depths[t] += 1
    return AdapterLayout(dims=[b.attn1.to_q.in_features for b, _, _ in blocks],
                         heads=[b.attn1.heads for b, _, _ in blocks],
                         levels=[lvl for _, lvl, _ in blocks], depths=depths)


class InstantBoothHooks:
    """InstantBooth's adapters attached to a diffusers UNet. Use as a context manager or call ``remove()``.

    Keys/values of f_p are computed once here and reused at every denoising step."""

    def __init__(self, unet, instantbooth: InstantBooth, f_p: torch.Tensor | None, beta: float,
                 enabled: Sequence[bool] | None = None, cond_only: bool = False, region: torch.Tensor | None = None,
                 window: tuple[float, float] | None = None):
        """``cond_only``: the batch is [unconditional; conditional] halves (hosts.sampling's layout) and the adapters
        act on the conditional half only (InstantBoothConfig.adapters_on_uncond = False). ``region``: [H, W] in
        [0, 1] (backend.regions): the adapter term acts only on the tokens inside it, at every block's resolution;
        several concepts in one image are several hooks, each with its own region (None: the whole image).
        ``window``: (lo, hi) timesteps (backend.instantbooth.timestep_window): the adapters act only while the UNet
        runs at a timestep in it (None: every step)."""
        layout = adapter_layout(unet)
        want = instantbooth.config.layout
        if (layout.dims, layout.depths) != (want.dims, want.depths):
            raise ValueError(f"the UNet's transformer blocks (widths {layout.dims}, depths {layout.depths}) do not "
                             f"match the InstantBooth file's (widths {want.dims}, depths {want.depths}); the file is "
                             f"for another base model")
        self.instantbooth, self.beta, self.cond_only = instantbooth, float(beta), bool(cond_only)
        self.region = None if region is None else check_mask(region)
        self._token_masks: dict[tuple[int, int, int], torch.Tensor] = {}
        self.window = window
        self._latent_size: tuple[int, int] | None = None  # the UNet's input [rows, columns], for the region's grid
        self._timestep: float | None = None  # the UNet's timestep now, for the window
        self.enabled = list(enabled) if enabled is not None else [True] * len(layout)
        self.kv = [None] * len(layout)
        self.residuals: list | None = None  # a list: every block's (adapter term, y) is appended (training reads them)
        if f_p is not None:
            with torch.no_grad():  # sampling: f_p is fixed for the whole run
                self.set_f_p(f_p)
        self.unet = unet
        self._handles = []
        for i, (block, _, _) in enumerate(transformer_blocks(unet)):
            if getattr(block, "norm_type", "layer_norm") not in ("layer_norm", "layer_norm_i2vgen"):
                raise ValueError(f"transformer block {i} uses norm_type {block.norm_type!r}; the InstantBooth adapter "
                                 f"supports Stable Diffusion's layer-norm blocks only")
        self.attach()

    def attach(self) -> None:
        """Register the hooks (done on construction; again after ``remove()``)."""
        if self._handles:
            return
        if self.region is not None or self.window is not None:
            self._handles.append(self.unet.register_forward_pre_hook(self._keep_unet_input, with_kwargs=True))
        for i, (block, _, _) in enumerate(transformer_blocks(self.unet)):
            if self.beta == 0 or not self.enabled[i] or (self.region is not None and not bool(self.region.any())):
                continue  # nothing to add: the UNet runs exactly as without the hooks
            state = {}
            self._handles.append(block.register_forward_pre_hook(self._keep_input(state), with_kwargs=True))
            # attn1's own output, kept ahead of every concept's hook: with several concepts on one UNet each adapter
            # sees the same y and their terms add up, instead of one concept's term feeding the next one's input
            self._handles.append(block.attn1.register_forward_hook(self._keep_output(state), prepend=True))
            self._handles.append(block.attn1.register_forward_hook(self._add_adapter(i, state)))

    def set_f_p(self, f_p: torch.Tensor) -> None:
        """Keys/values of f_p ([M, ctx] or per sample [B, M, ctx]) for every enabled adapter. In training this runs
        with gradients on every step, so they flow back into the patch encoder and the adapters."""
        self.kv = (self.instantbooth.patch_kv(f_p, self.enabled) if self.beta != 0
                   else [None] * len(self.enabled))

    def _keep_unet_input(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self._latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))
        self._timestep = float(torch.as_tensor(timestep).flatten()[0])  # one timestep per batch while sampling

    @staticmethod
    def _keep_input(state):
        def hook(module, args, kwargs):
            state["x"] = args[0] if args else kwargs["hidden_states"]
        return hook

    @staticmethod
    def _keep_output(state):
        def hook(module, args, output):
            state["out"] = output
        return hook

    def _add_adapter(self, i: int, state):
        adapter = self.instantbooth.adapters[i]

        def hook(module, args, output):
            if self.window is not None and not self.window[0] <= self._timestep <= self.window[1]:
                return output
            # the block will compute output + x; the adapter sees y = attn1's output + x and adds its gated residual
            y = state["out"] + state["x"]
            if self.cond_only:
                h = y.shape[0] // 2
                r = torch.cat([torch.zeros_like(y[:h]), adapter.residual(y[h:], beta=self.beta, kv=self.kv[i])])
            else:
                r = adapter.residual(y, beta=self.beta, kv=self.kv[i])
            if self.region is not None:
                r = r * self.token_mask(y.shape[1]).to(r)[None, :, None]
            if self.residuals is not None:
                self.residuals.append((r, y))
            return output + r
        return hook

    @contextmanager
    def attached(self):
        """The hooks on while inside, off after (region compositing turns each concept on for its own prediction);
        yields the UNet."""
        self.attach()
        try:
            yield self.unet
        finally:
            self.remove()

    def token_mask(self, tokens: int) -> torch.Tensor:
        """The region at a block of ``tokens`` tokens of the latent the UNet runs on now (its grid read from the
        latent's shape, exact for odd sizes); computed once per grid."""
        if self._latent_size is None:
            raise RuntimeError("a region's InstantBooth hooks ran a transformer block outside a UNet forward")
        key = (tokens, *self._latent_size)
        if key not in self._token_masks:
            self._token_masks[key] = token_mask(self.region, *key)
        return self._token_masks[key]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def sampling_hooks(model, instantbooth: InstantBooth, f_p: torch.Tensor, beta: float,
                   enabled: Sequence[bool] | None = None, region: torch.Tensor | None = None,
                   start_percent: float | None = None, end_percent: float = 1.0) -> InstantBoothHooks:
    """The hooks for sampling ``model`` (hosts.loading.SDModel) as the file says: its guidance setting
    (``adapters_on_uncond``) and the share of sampling the adapters act in (``start_percent`` None: the file's)."""
    c = instantbooth.config
    start = c.start_percent if start_percent is None else start_percent
    window = timestep_window(start, end_percent, model.scheduler.config.num_train_timesteps)
    return InstantBoothHooks(model.unet, instantbooth, f_p, beta, enabled, cond_only=not c.adapters_on_uncond,
                             region=region, window=window)


def encode_images(vision_model, images: torch.Tensor, masks: torch.Tensor | None, instantbooth: InstantBooth):
    """Run the frozen CLIP vision backbone (transformers ``CLIPVisionModelWithProjection``) on the preprocessed
    concept images: -> (global features [N, D] = image_embeds, tokens [N, T, D] = last_hidden_state, the backbone's
    input [N, 3, S, S]), the arguments of ``InstantBooth.encode``."""
    c = instantbooth.config
    pixels = prepare_concept_images(images, masks, c.image_size, c.crop_margin, c.background)
    param = next(vision_model.parameters())
    with torch.no_grad():
        out = vision_model(pixel_values=pixels.to(param.device, param.dtype))
    return out.image_embeds, out.last_hidden_state, pixels


def tokenize_chunks(tokenizer, prompt: str) -> list[list[int]]:
    """One chunk of model_max_length tokens, as the diffusers pipelines feed the text encoder (longer prompts are
    truncated there; the ComfyUI nodes handle any number of chunks)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    return [list(ids)]


def identifier_rows(tokenizer, prompt: str, identifier: str) -> list[int]:
    ident_ids = tokenizer(identifier, add_special_tokens=False).input_ids
    rows = find_identifier_rows(tokenize_chunks(tokenizer, prompt), ident_ids)
    if not rows:
        raise ValueError(f"the prompt {prompt!r} does not contain the identifier {identifier!r} within its first "
                         f"{tokenizer.model_max_length} tokens; add it before the class noun (e.g. "
                         f"'a photo of {identifier} {{class noun}}')")
    return rows


def encode_prompt(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    """SD1.x/SD2.x/toy text conditioning, as diffusers' StableDiffusionPipeline computes it: [1, 77, ctx]."""
    ids = torch.tensor(tokenize_chunks(tokenizer, prompt), device=text_encoder.device)
    with torch.no_grad():
        return text_encoder(ids)[0]


def condition_with_concept(cond: torch.Tensor, tokenizer, prompt: str, concept: Concept, alpha: float) -> torch.Tensor:
    """Replace the identifier's rows of an encoded prompt by α·f_c."""
    rows = identifier_rows(tokenizer, prompt, concept.identifier)
    return inject_concept(cond, rows, concept.f_c, alpha)
