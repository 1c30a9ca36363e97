"""E4T, encoder-based domain tuning (the E4T paper): a domain encoder predicts the identifier's word embedding from one
image, a set of regularised weight offsets draws the denoiser towards the domain, and both are tuned for 5-15 steps
on the one image at use time, starting from their pre-trained state.

* Encoder (dual path): class tokens of several layers of the frozen CLIP vision backbone, and the denoiser's own
  encoder features of the *noised* image at the current timestep (spatially pooled down-block and mid-block
  outputs), mapped by small trained layers to one word embedding per text encoder. The identifier's input embedding
  is ``class-word embedding + scale · prediction``, with an L2 penalty on the prediction.
* Weight offsets: every attention projection W of the denoiser — and every other Linear of its transformer blocks
  (feed-forward, proj_in/out) — becomes ``W ∘ (1 + Δ)`` (elementwise), Δ = U·V of rank r. U starts at 0, so Δ = 0
  and the untouched model is exact; applied by replacing each target layer's forward while attached (one matmul
  with W ∘ (1 + Δ)), never by writing the base weights.
* The photo's scales (``modulation_rank`` > 0; not in the paper): the encoder also predicts, from the photo's class
  tokens, a scale s of each target layer's output channels, y = (1 + s) ⊙ x·(W ∘ (1 + Δ))ᵀ + b, s = P·code(photo)
  of rank ``modulation_rank``. The paper's word embedding carries the identity only where the base model's text path
  can name one; these are weight offsets predicted from the image. Zero for an untrained encoder; a tuned concept's
  are fixed to its photo and folded into Δ (:func:`fix_scales`), so its weight diffs stay W ∘ Δ.

Host-independent: a host resolves the offsets' modules, runs the frozen backbones and hands in callables —
``features(x_t, t, cond) -> [pooled [B, C_i]]`` (no gradient), ``encode(vectors, prompt_ids) -> cond`` (vectors: one
[B, 1, width] tensor per text encoder, differentiable) and ``predict(x_t, t, cond)`` — and :func:`tune` reuses the
quick-tune loop (progress, cancel, NaN guard)."""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .files import (FormatError, _Fields, check_bounds, check_finite, check_shapes, load_module, read_safetensors,
                    refuse_existing, write_safetensors)
from .instantbooth import FAMILIES
from .lora import UNET_PREFIX, LoRATensors, find_targets, kohya_name
from .tune import NoiseSchedule, TuneResult, tune_loop

# every attention projection of a transformer block: self- and cross-attention q, k, v and out
ATTENTION_PROJECTION = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
# the cross-attention keys and values: the only projections that read the prompt
CROSS_ATTENTION_KV = re.compile(r"(^|\.)attn2\.(to_k|to_v)$")

Features = Callable[[torch.Tensor, torch.Tensor, Any], Sequence[torch.Tensor]]
Encode = Callable[[Sequence[torch.Tensor], torch.Tensor], Any]
Predict = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
WeightOf = Callable[[nn.Module, torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class E4TConfig:
    family: str
    word_dims: list[int]  # input-embedding width of each text encoder (SDXL: CLIP-L, CLIP-G)
    vision_dim: int  # the CLIP vision backbone's hidden width
    vision_layers: list[int]  # hidden_states indices whose class tokens the encoder reads
    unet_dims: list[int]  # channels of the pooled denoiser features, in the host's order
    targets: list[str]  # modules (diffusers paths) that get offsets: offset_targets(), or the file's own list
    target_shapes: list[list[int]]  # [out, in] of each
    identifier: str = "sks"
    class_word: str = "person"  # default; a tune may name another class word of the domain
    scale: float = 0.1  # identifier = class word + scale · prediction
    rank: int = 1  # rank of Δ
    hidden: int = 256
    reg_embedding: float = 0.01  # λ · mean ||prediction||²
    reg_offsets: float = 0.0  # λ · mean Δ² (+ λ · mean s² of the photo's scales)
    # λ · the squared difference, off the subject's mask, between the model with the offsets and the base model with
    # the class word (the same noised input), in pre-training. A loss on the mask alone leaves the background free,
    # and the offsets pre-trained that way cost the toy base 15 % of its alignment on the context words before tuning
    reg_background: float = 0.0
    tune_steps: int = 15
    tune_lr: float = 1e-4  # the offsets' rate in the tune (and the encoder's, unless tune_encoder_lr is set)
    # The encoder's own rate: its dense layers move by about the rate at every Adam step, and at the offsets' rate
    # its prediction ran away (|prediction| in the tens against 0.17 for a token embedding on the toy world)
    tune_encoder_lr: float | None = None
    tune_batch: int = 4  # noise/timestep draws per step, taken from the tune's images in turn
    # also tune on the mirrored image (the hosts add it; half of each step's draws): a subject seen from either
    # side. Off by default: wrong for subjects that are not mirror-symmetric in kind (text, logos)
    tune_flip: bool = False
    # Whether the tune moves the cross-attention keys' and values' offsets (their pre-trained offsets apply either
    # way): the only projections that read the prompt, so a tune on one image under one prompt can re-map the
    # context words through them. On the toy world turning it off made no difference beyond the draws' spread
    tune_cross_kv: bool = True
    # which offsets the tune moves: a regular expression searched in each target's path (empty: all of them); the
    # others keep their pre-trained values and still apply. On the toy world the feed-forward offsets alone
    # ("\.ff\."), at 2.5 × the rate, learnt more of the identity within the bar on the context words (README)
    tune_targets: str = ""
    # The tune's noise levels: t uniform in [0, tune_max_timestep · T). One image and 15 steps leave no draws to spare
    # on the noisiest levels, where the image is mostly gone; the subject's detail is learnt at the lower ones
    tune_max_timestep: float = 1.0
    # rank of the photo's output-channel scales the encoder predicts (module docstring); 0: none, as in the paper.
    # On the toy world, whose text path never names an identity, 8 lifted E4T-0 from the base's identity (README)
    modulation_rank: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.targets) != len(self.target_shapes):
            raise ValueError(f"{len(self.targets)} targets but {len(self.target_shapes)} shapes")
        if not self.word_dims or not self.unet_dims or not self.vision_layers:
            raise ValueError("word_dims, unet_dims and vision_layers must not be empty")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.modulation_rank < 0:
            raise ValueError(f"modulation_rank must be 0 (none) or more, got {self.modulation_rank}")
        if not 0 < self.tune_max_timestep <= 1:
            raise ValueError(f"tune_max_timestep is a fraction of the schedule in (0, 1], got {self.tune_max_timestep}")
        if self.tune_targets:
            try:
                rx = re.compile(self.tune_targets)
            except re.error as e:
                raise ValueError(f"tune_targets {self.tune_targets!r} is not a regular expression: {e}") from None
            if self.targets and not any(rx.search(t) for t in self.targets):
                raise ValueError(f"tune_targets {self.tune_targets!r} matches none of the {len(self.targets)} offset "
                                 f"targets (e.g. {self.targets[0]!r}): the tune would move no offset")


class DomainEncoder(nn.Module):
    """The dual-path encoder: (class tokens [B, L, D], pooled denoiser features [[B, C_i]]) -> one prediction per
    text encoder [B, width]. The last layer starts at zero, so an untrained encoder predicts 0 (the class word)."""

    def __init__(self, c: E4TConfig):
        super().__init__()
        self.word_dims = list(c.word_dims)
        self.vision = nn.Sequential(nn.LayerNorm(c.vision_dim * len(c.vision_layers)),
                                    nn.Linear(c.vision_dim * len(c.vision_layers), c.hidden))
        self.unet = nn.ModuleList(nn.Linear(d, c.hidden) for d in c.unet_dims)
        self.mlp = nn.Sequential(nn.LeakyReLU(), nn.Linear(c.hidden, c.hidden), nn.LeakyReLU(),
                                 nn.Linear(c.hidden, sum(c.word_dims)))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.outs = [o for o, _ in c.target_shapes]
        k = self.k = c.modulation_rank
        if k:
            self.modulation = nn.Sequential(nn.LeakyReLU(), nn.Linear(c.hidden, c.hidden), nn.LeakyReLU(),
                                            nn.Linear(c.hidden, k * len(self.outs)))
            nn.init.zeros_(self.modulation[-1].weight)
            nn.init.zeros_(self.modulation[-1].bias)
            self.bases = nn.ParameterList(nn.Parameter(torch.randn(o, k) / k ** 0.5) for o in self.outs)

    def scales(self, class_tokens: torch.Tensor) -> list[torch.Tensor] | None:
        """Per target layer, the scale s [B, out] of its output channels predicted from the photo (None without
        modulation). Zero for an untrained encoder."""
        if not self.k:
            return None
        code = self.modulation(self.vision(class_tokens.flatten(1).float())).unflatten(-1, (len(self.outs), self.k))
        return [code[:, i] @ b.t() for i, b in enumerate(self.bases)]

    def forward(self, class_tokens: torch.Tensor, unet_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(unet_features) != len(self.unet):
            raise ValueError(f"expected {len(self.unet)} denoiser features, got {len(unet_features)}")
        h = self.vision(class_tokens.flatten(1).float())
        for layer, f in zip(self.unet, unet_features):
            h = h + layer(f.float())
        return list(self.mlp(h).split(self.word_dims, dim=-1))


class Offset(nn.Module):
    """Δ = U·V of rank r for one [out, in] weight; U = 0 at the start."""

    def __init__(self, out_features: int, in_features: int, rank: int):
        super().__init__()
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.down = nn.Parameter(torch.randn(rank, in_features) / rank)

    def delta(self) -> torch.Tensor:
        return self.up @ self.down


class WeightOffsets(nn.Module):
    def __init__(self, c: E4TConfig):
        super().__init__()
        self.names = list(c.targets)
        self.offsets = nn.ModuleList(Offset(o, i, c.rank) for o, i in c.target_shapes)
        self.enabled = True  # while False the attached layers run their own forward (:meth:`bypassed`)
        # How an attached layer's forward reads its weight and bias for an input x: ``weight_of(module, x) -> (W, b)``.
        # None: the module's own tensors, captured at attach. A host whose layers compute their weight per call (ComfyUI
        # low-VRAM: moved to the device and given its patches, e.g. a LoRA loaded before, in the forward) passes its own
        self.weight_of: WeightOf | None = None
        # The photo's output-channel scales s per target (``modulation_rank``): [B, out] from an objective until the
        # next (through its backward pass), or a concept's fixed [out] after a tune (:func:`fix_scales`); None: none
        self.scales: list[torch.Tensor] | None = None

    def __getstate__(self) -> dict:
        # an objective's scales are tensors of its graph, which deepcopy and pickle refuse: a copy takes them detached
        state = super().__getstate__()
        if state.get("scales") is not None:
            state = {**state, "scales": [s.detach() for s in state["scales"]]}
        return state

    @contextmanager
    def scaled(self, scales: list[torch.Tensor] | None) -> Iterator[None]:
        """The attached layers' outputs scaled by ``scales`` (one [B, out] per target) while inside."""
        old, self.scales = self.scales, scales
        try:
            yield
        finally:
            self.scales = old

    def deltas(self) -> dict[str, torch.Tensor]:
        """Δ per target; with a concept's fixed scales folded in, (1 + s)·1ᵀ ∘ (1 + Δ) - 1: the layer's whole
        change is then W ∘ Δ, as without modulation."""
        if self.scales is None:
            return {n: o.delta() for n, o in zip(self.names, self.offsets)}
        return {n: (1 + s.reshape(-1, 1)) * (1 + o.delta()) - 1
                for n, o, s in zip(self.names, self.offsets, self.scales)}

    def penalty(self) -> torch.Tensor:
        return torch.stack([o.delta().pow(2).mean() for o in self.offsets]).mean()

    def attach(self, modules: Mapping[str, nn.Module]) -> list["OffsetForward"]:
        """Make each target Linear compute x·(W ∘ (1 + Δ))ᵀ + b, differentiable in Δ, the base weight never written
        (:class:`OffsetForward`). ``modules`` maps the target names to the host's modules. Returns handles with
        ``remove()``; they must stay attached through the backward pass (gradient checkpointing re-runs the forward
        there)."""
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise ValueError(f"the denoiser has no module for offsets {missing[:3]}"
                             f"{'...' if len(missing) > 3 else ''}: the E4T file is for another architecture")
        return [OffsetForward(self, modules[name], offset, i)
                for i, (name, offset) in enumerate(zip(self.names, self.offsets))]

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """The attached layers run their own forward while inside (the base model's prediction without detaching
        and re-attaching the offsets)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    @contextmanager
    def applied(self, modules: Mapping[str, nn.Module]) -> Iterator[None]:
        """:meth:`attach` while inside, removed on exit."""
        handles = self.attach(modules)
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def weight_diffs(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """W ∘ Δ per target: the exact change of each weight, for a weight-diff file that stock loaders apply."""
        return {n: weights[n].float() * d.float() for n, d in self.deltas().items()}


class OffsetForward:
    """A Linear's forward replaced by x·(W ∘ (1 + Δ))ᵀ + b while attached, as an instance attribute (kohya's
    LoRA networks do the same), and the module's own forward back on :meth:`remove`. One matmul with the offset
    weight: a forward hook adding x·(W ∘ Δ)ᵀ to the module's output costs a second full-width one (E4T's Δ is
    elementwise, not low-rank); `boothkit bench e4t` timed the hook at 5.3 s against 5.0 s for a toy tune (README).
    At Δ = 0 the weight is W · 1, the base layer bit for bit; while the owner is :meth:`WeightOffsets.bypassed` the
    module's own forward runs. W is the module's weight captured at attach, or, where the host computes it per call
    (the owner's ``weight_of``), that. Removal is last-in, first-out: a forward set on top of this one must go
    first."""

    def __init__(self, owner: WeightOffsets, module: nn.Module, offset: Offset, index: int):
        self.owner, self.module, self.offset, self.index = owner, module, offset, index
        self.weight = None
        if owner.weight_of is None:
            # a host's frozen weight may be an inference tensor (ComfyUI), which autograd cannot save: a copy then
            w = module.weight
            self.weight = w.detach().clone() if w.is_inference() else w
        self.own = module.__dict__.get("forward")  # a forward another tool set on the instance, restored after
        self.inner = module.forward
        self.removed = False
        module.forward = self

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.owner.enabled:
            return self.inner(x, *args, **kwargs)
        if self.weight is None:
            w, b = self.owner.weight_of(self.module, x)
        else:
            w, b = self.weight.to(device=x.device, dtype=x.dtype), self.module.bias
        w = w * (1 + self.offset.delta().to(x.dtype))
        b = None if b is None else b.to(x)
        if self.owner.scales is None:
            return F.linear(x, w, b)
        s = self.owner.scales[self.index].to(x.dtype)
        if s.ndim == 2:  # one row per batch item, broadcast over the tokens
            s = s.reshape(s.shape[0], *[1] * (x.ndim - 2), s.shape[-1])
        y = F.linear(x, w) * (1 + s)
        return y if b is None else y + b

    def remove(self) -> None:
        if self.removed:
            return
        if self.module.__dict__.get("forward") is not self:
            # restoring ours would drop the forward set on top of it, keeping it would leave the offsets applied
            raise RuntimeError(f"another forward was set on {type(self.module).__name__} after the E4T offsets; "
                               "remove it first")
        self.removed = True
        if self.own is None:
            del self.module.forward
        else:
            self.module.forward = self.own


class _Stop(Exception):
    """Raised by the last feature hook: the decoder half of the denoiser is not needed for the features."""


def denoiser_features(predict: Predict, blocks: Sequence[nn.Module]) -> Features:
    """``features(x_t, t, cond)``: the spatial mean of each of ``blocks``' outputs (the host passes the blocks that
    end each resolution level of the denoiser's encoder, then its middle block), from one forward pass of
    ``predict`` that stops after the last of them."""
    blocks = list(blocks)
    last = blocks[-1]

    def features(x_t, t, cond):
        pooled = []

        def grab(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            pooled.append(h.float().mean(dim=(-2, -1)))
            if module is last:
                raise _Stop

        handles = [b.register_forward_hook(grab) for b in blocks]
        try:
            predict(x_t, t, cond)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return pooled
    return features


def weight_diff_file(offsets: "WeightOffsets", weights: Mapping[str, torch.Tensor], family: str, identifier: str,
                     base_model_version: str) -> LoRATensors:
    """The offsets as exact weight changes W ∘ Δ under kohya names (diffusers module paths) with ``.diff``: ComfyUI's
    LoraLoader and A1111's "full" networks apply them as W + diff."""
    dtype = next(iter(weights.values())).dtype
    tensors = {f"{kohya_name(UNET_PREFIX, n)}.diff": d.to(dtype) for n, d in offsets.weight_diffs(weights).items()}
    metadata = {"format": "boothkit.weight_diff", "version": "1", "method": "e4t", "family": family,
                "identifier": identifier, "ss_base_model_version": base_model_version,
                "ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "full"}'}
    return LoRATensors(tensors, metadata)


class E4T(nn.Module):
    """The pre-trained (or tuned) domain encoder and weight offsets; all of its parameters are trained."""

    def __init__(self, config: E4TConfig):
        super().__init__()
        self.config = config
        self.encoder = DomainEncoder(config)
        self.offsets = WeightOffsets(config)

    def vectors(self, class_vectors: Sequence[torch.Tensor], prediction: Sequence[torch.Tensor]
                ) -> list[torch.Tensor]:
        """The identifier's input embedding per text encoder: class word + scale · prediction -> [B, 1, width]."""
        s = self.config.scale
        return [(c.to(p) + s * p).unsqueeze(1) for c, p in zip(class_vectors, prediction)]


def attention_targets(names: Sequence[str]) -> list[str]:
    """The attention projections among a denoiser's module paths (diffusers naming)."""
    return [n for n in names if ATTENTION_PROJECTION.search(n)]


def offset_targets(unet: nn.Module) -> list[str]:
    """The modules of ``unet`` that get offsets (its own module paths): every Linear that LoRA adapts
    (:func:`backend.lora.find_targets`), i.e. of the transformer blocks — the attention projections the paper names,
    plus the feed-forward layers and the Linear proj_in/out. On the toy world the wider set gives a 15-step tune from
    scratch about 1.5x the identity of the attention projections alone (README, "E4T"). 1x1 convolutions (SD1's
    proj_in/out) are left out: the offsets' hook is a Linear's."""
    return [p for p, (m, _) in find_targets(unet).items() if isinstance(m, nn.Linear)]


@dataclass
class Batch:
    """What one objective evaluation needs: x0 [B, C, h, w], the class tokens of the images [B, L, D], the class
    word's input embedding per text encoder ([B, width] or [width]), and the prompts (indices into the host's)."""
    x0: torch.Tensor
    class_tokens: torch.Tensor
    class_vectors: Sequence[torch.Tensor]
    prompt_ids: torch.Tensor
    masks: torch.Tensor | None = None


def objective(e4t: E4T, batch: Batch, features: Features, encode: Encode, predict: Predict,
              schedule: NoiseSchedule, modules: Mapping[str, nn.Module], generator: torch.Generator | None = None,
              regularise: bool = True, max_timestep: int | None = None, background: bool = True,
              stats: dict | None = None) -> torch.Tensor:
    """Denoising loss with the predicted identifier and the offsets applied, plus the regularisers (unless
    ``regularise`` is off, for validation) — the one loss of pre-training and of tuning. Timesteps are drawn from
    [0, ``max_timestep``) (default: the whole schedule). ``background`` off leaves out ``reg_background`` (the tune
    does: it costs a forward pass a step, and on the toy world a tune with it learnt less of the identity). The
    caller keeps the offsets attached to ``modules`` (:meth:`WeightOffsets.attach`) through the forward and the
    backward pass. A ``stats`` dict receives ``identifier_shift``: the mean of |scale · prediction| / |class word|,
    how far the encoder moves the identifier from the class word (near 0: the encoder has no say)."""
    c = e4t.config
    x0 = batch.x0
    b = x0.shape[0]
    # drawn where the generator lives (the trainer's are on the CPU), so a run's noise is the same on any device
    where = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=where).to(x0)
    hi = schedule.num_timesteps if max_timestep is None else max_timestep
    t = torch.randint(0, hi, (b,), generator=generator, device=where).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    class_vectors = [v.expand(b, -1) if v.ndim == 1 else v for v in batch.class_vectors]
    with torch.no_grad():  # the denoiser's features are an input of the encoder, not a path for gradients
        class_cond = encode([v.unsqueeze(1) for v in class_vectors], batch.prompt_ids)
        with e4t.offsets.scaled(None):  # the photo's scales are not in the encoder's input
            feats = features(x_t, t, class_cond)
    prediction = e4t.encoder(batch.class_tokens, [f.detach() for f in feats])
    cond = encode(e4t.vectors(class_vectors, prediction), batch.prompt_ids)
    if stats is not None:
        stats["identifier_shift"] = torch.stack([(c.scale * p.float()).norm(dim=-1) / v.float().norm(dim=-1)
                                                 for p, v in zip(prediction, class_vectors)]).mean().item()
    # set, not scoped: gradient checkpointing re-runs the forward in the backward pass, after this returns; the next
    # objective replaces them, and the tune clears them at its end
    scales = e4t.offsets.scales = e4t.encoder.scales(batch.class_tokens)
    out = predict(x_t, t, cond)
    err = (out.float() - schedule.target(x0, noise, t).float()) ** 2
    if batch.masks is not None:
        m = batch.masks.to(err.dtype)
        loss = (err * m).sum() / (m.sum() * err.shape[1]).clamp_min(1e-8)
    else:
        loss = err.mean()
    if not regularise:
        return loss
    loss = loss + c.reg_embedding * torch.stack([p.float().pow(2).sum(-1).mean() for p in prediction]).sum()
    if c.reg_offsets:
        loss = loss + c.reg_offsets * e4t.offsets.penalty()
        if scales is not None:
            loss = loss + c.reg_offsets * torch.stack([s.pow(2).mean() for s in scales]).mean()
    if c.reg_background and background and batch.masks is not None:
        with torch.no_grad(), e4t.offsets.bypassed():
            base = predict(x_t, t, class_cond).float()
        off = 1 - batch.masks.to(err.dtype)
        drift = ((out.float() - base) ** 2 * off).sum() / (off.sum() * err.shape[1]).clamp_min(1e-8)
        loss = loss + c.reg_background * drift
    return loss


@torch.no_grad()
def fix_scales(e4t: E4T, class_tokens: torch.Tensor) -> None:
    """A tuned concept's output-channel scales, fixed to its photo's ([out] per target; without modulation, none):
    the attached offsets apply them, and :meth:`WeightOffsets.deltas` folds them into the weight diffs."""
    scales = e4t.encoder.scales(class_tokens[:1])
    e4t.offsets.scales = None if scales is None else [s[0] for s in scales]


@torch.no_grad()
def concept_vectors(e4t: E4T, x0: torch.Tensor, class_tokens: torch.Tensor, class_vectors: Sequence[torch.Tensor],
                    features: Features, encode: Encode, schedule: NoiseSchedule, modules: Mapping[str, nn.Module],
                    prompt_ids: torch.Tensor, timesteps: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """The identifier's embedding of a (tuned) concept as one fixed vector per text encoder [width]: the encoder's
    prediction averaged over timesteps spread across the schedule (fixed noise), so that the concept can be saved as
    a standard embedding and sampled without the encoder."""
    g = torch.Generator().manual_seed(seed)
    n = schedule.num_timesteps
    t = torch.linspace(n * 0.1, n * 0.9, timesteps, device=x0.device).long()
    x = x0[:1].expand(timesteps, *x0.shape[1:])
    noise = torch.randn(x.shape, generator=g).to(x)
    x_t = schedule.add_noise(x, noise, t)
    cv = [v.reshape(1, -1).expand(timesteps, -1) for v in class_vectors]
    ids = prompt_ids[:1].expand(timesteps)
    with e4t.offsets.applied(modules):
        with e4t.offsets.scaled(None):
            feats = features(x_t, t, encode([v.unsqueeze(1) for v in cv], ids))
    prediction = e4t.encoder(class_tokens[:1].expand(timesteps, *class_tokens.shape[1:]), feats)
    return [v.mean(0)[0] for v in e4t.vectors(cv, prediction)]


def fix_concept(e4t: E4T, batch: Batch, features: Features, encode: Encode, schedule: NoiseSchedule,
                modules: Mapping[str, nn.Module], seed: int = 0) -> list[torch.Tensor]:
    """A (tuned) concept's fixed form, what every host does after the tune: its photo's scales set on the offsets
    (:func:`fix_scales`) and the identifier's embedding returned (:func:`concept_vectors`)."""
    fix_scales(e4t, batch.class_tokens)
    return concept_vectors(e4t, batch.x0, batch.class_tokens, batch.class_vectors, features, encode, schedule,
                           modules, batch.prompt_ids, seed=seed)


def tune(e4t: E4T, batch: Batch, features: Features, encode: Encode, predict: Predict, schedule: NoiseSchedule,
         modules: Mapping[str, nn.Module], steps: int | None = None, lr: float | None = None, seed: int = 0,
         on_progress=None, should_cancel=None, mixed_precision: str = "no") -> TuneResult:
    """Tune the encoder and the offsets on one concept for ``steps`` steps (the file's default, 15), starting from
    the state ``e4t`` holds (tune a copy to keep the pre-trained one). ``batch`` holds the concept's image (and, with
    ``tune_flip``, its mirror image: the hosts add it); each step draws ``tune_batch`` noise levels (timesteps below
    ``tune_max_timestep`` of the schedule), taking the batch's entries in turn, shifted by one each step."""
    c = e4t.config
    steps = c.tune_steps if steps is None else steps
    g = torch.Generator().manual_seed(seed)
    k = max(c.tune_batch, 1)
    vectors = [v.reshape(1, -1).repeat(k, 1) for v in batch.class_vectors]
    hi = max(1, round(c.tune_max_timestep * schedule.num_timesteps))

    def loss_fn(step: int) -> torch.Tensor:
        i = (torch.arange(k) + step) % batch.x0.shape[0]
        rep = Batch(batch.x0[i], batch.class_tokens[i], vectors, batch.prompt_ids[i],
                    None if batch.masks is None else batch.masks[i])
        return objective(e4t, rep, features, encode, predict, schedule, modules, g, max_timestep=hi, background=False)

    rate = c.tune_lr if lr is None else lr
    offsets = [o for name, o in zip(c.targets, e4t.offsets.offsets)
               if (c.tune_cross_kv or not CROSS_ATTENTION_KV.search(name)) and re.search(c.tune_targets, name)]
    groups = [{"params": [p for p in e4t.encoder.parameters() if p.requires_grad],
               "lr": rate if c.tune_encoder_lr is None else c.tune_encoder_lr},
              {"params": [p for o in offsets for p in o.parameters() if p.requires_grad], "lr": rate}]
    with e4t.offsets.applied(modules):
        try:
            return tune_loop(groups, loss_fn, steps, rate, on_progress, should_cancel,
                             mixed_precision=mixed_precision)
        finally:
            e4t.offsets.scales = None  # the last step's; a concept's are fixed after (fix_concept)


# ----------------------------------------------------------------------------------------------------------------
# E4T: the pre-trained (or tuned) domain encoder and weight offsets

E4T_FORMAT = "boothkit.e4t"
E4T_VERSION = 1


def save_e4t(path: str | Path, model) -> Path:
    """Only the encoder and the offsets go into the file; the configuration is metadata."""
    from dataclasses import asdict

    config = asdict(model.config)
    extra = config.pop("extra")
    metadata = {"format": E4T_FORMAT, "version": str(E4T_VERSION), "method": "e4t", "family": model.config.family,
                "identifier": model.config.identifier, "class_word": model.config.class_word,
                "config": json.dumps(config, sort_keys=True),
                "training": json.dumps(extra, sort_keys=True, default=str)}
    return write_safetensors(path, model.state_dict(), metadata)


def _fields_of(path, metadata: dict[str, str], fmt: str, version: int, what: str, family: str | None,
               mismatch: str) -> tuple[_Fields, str]:
    """The metadata of one of E4T's files, its kind checked, and its base family (refused, with ``mismatch``
    filled in, when the model's ``family`` is another)."""
    f = _Fields(path, metadata)
    f.kind(fmt, version, "e4t", what)
    fam = f.str("family", set(FAMILIES))
    if family is not None and family != fam:
        raise FormatError(f"{path}: " + mismatch.format(file=fam, model=family))
    return f, fam


def load_e4t(path: str | Path, family: str | None = None):
    """Load and validate an E4T file; ``family`` is that of the model it will tune."""
    from .e4t import E4T, E4TConfig

    def config_from_metadata(metadata: dict[str, str]) -> E4TConfig:
        f, fam = _fields_of(path, metadata, E4T_FORMAT, E4T_VERSION, "an E4T file", family,
                            "this E4T file was pre-trained for base family '{file}', but the model to tune is "
                            "'{model}'; load an E4T file made for {model}.")
        raw = f.json("config")
        if not isinstance(raw, dict):
            raise f.error("config", str(raw)[:80], "a JSON object")
        check_bounds(path, "config", raw)
        try:
            extra = json.loads(metadata.get("training", "{}"))
        except json.JSONDecodeError:
            raise f.error("training", metadata["training"][:80], "JSON") from None
        try:
            config = E4TConfig(**{**raw, "extra": extra})
        except (TypeError, ValueError) as e:
            raise f.error("config", str(raw)[:80], f"the fields of an E4T configuration ({e})") from None
        if config.family != fam:
            raise f.error("config", f"family {config.family!r}", f"the file's family {fam!r}")
        return config

    return load_module(path, config_from_metadata, E4T, "configuration")


# ----------------------------------------------------------------------------------------------------------------
# A tuned E4T concept, compact: what sampling needs and nothing else (no encoder)

E4T_CONCEPT_FORMAT = "boothkit.e4t_concept"
E4T_CONCEPT_VERSION = 1
# the configuration fields a concept needs to rebuild its offsets and to say what it is; the encoder's (hidden,
# vision layers, regularisers) stay with the pre-trained file
CONCEPT_CONFIG_KEYS = ("family", "word_dims", "targets", "target_shapes", "identifier", "class_word", "rank",
                       "modulation_rank")


@dataclass
class E4TConceptData:
    """A tuned E4T concept as the compact file holds it: the weight offsets (U·V of each target, diffusers module
    paths; the photo's fixed output-channel scales set on them, or None), the identifier's embedding, the class word
    and the file's metadata. Apply with ``offsets.applied(modules)`` (a host maps ``offsets.names`` to its modules)
    and splice ``embedding`` into the prompt, as after a tune; no encoder is needed."""
    offsets: WeightOffsets
    embedding: Any  # backend.embedding.Embedding
    class_word: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.embedding.family

    @property
    def identifier(self) -> str:
        return self.embedding.identifier


def concept_tensors(offsets: WeightOffsets, embedding) -> dict[str, torch.Tensor]:
    """The compact file's tensors: ``offset.<target>.up`` [out, r] and ``.down`` [r, in] per target, ``scale.<target>``
    [out] per target when the concept has the photo's scales, ``embedding.<key>`` [n, width] per text encoder (the
    keys of a textual-inversion file: ``emb_params``; SDXL ``clip_l``, ``clip_g``)."""
    out = {}
    for name, o in zip(offsets.names, offsets.offsets):
        out[f"offset.{name}.up"] = o.up.detach().float()
        out[f"offset.{name}.down"] = o.down.detach().float()
    if offsets.scales is not None:
        for name, s in zip(offsets.names, offsets.scales):
            if s.ndim != 1:
                raise ValueError(f"scale of {name!r} is {tuple(s.shape)}; a concept's scales are fixed to its photo "
                                 f"([out] per target, fix_scales)")
            out[f"scale.{name}"] = s.detach().float()
    for key, v in embedding.vectors.items():
        out[f"embedding.{key}"] = v.detach().float()
    return out


def save_e4t_concept(path: str | Path, config: E4TConfig, offsets: WeightOffsets, embedding, class_word: str,
                     training: Mapping[str, object] | None = None, overwrite: bool = False) -> Path:
    """Write a tuned concept compactly (:func:`concept_tensors`, fp32): 2.2 MB on the toy world (rank 16, 110
    layers), about 2.4 MB at rank 1 on SD1.5's 160 layers, against 0.48 GB of fp16 weight diffs for the stock export.
    Metadata: format, version, method, family, identifier, class_word, rank, num_vectors, widths (JSON {key: width}),
    targets (JSON list, the offsets' order), target_shapes (JSON [[out, in]]), modulation ("1" when scales are in),
    config (JSON, the fields of CONCEPT_CONFIG_KEYS), training (JSON)."""
    from dataclasses import asdict

    path = refuse_existing(path, overwrite, "overwrite=True (--overwrite)")
    if embedding.family != config.family:
        raise ValueError(f"the embedding is for '{embedding.family}', the offsets for '{config.family}'")
    if list(offsets.names) != list(config.targets):
        raise ValueError("the offsets' targets are not the configuration's")
    cfg = {k: v for k, v in asdict(config).items() if k in CONCEPT_CONFIG_KEYS}
    cfg["identifier"] = embedding.identifier
    cfg["class_word"] = class_word
    metadata = {"format": E4T_CONCEPT_FORMAT, "version": str(E4T_CONCEPT_VERSION), "method": "e4t",
                "family": config.family, "identifier": embedding.identifier, "class_word": class_word,
                "rank": str(config.rank), "num_vectors": str(embedding.num_vectors),
                "widths": json.dumps(embedding.widths(), sort_keys=True),
                "targets": json.dumps(list(config.targets)), "target_shapes": json.dumps(config.target_shapes),
                "modulation": "1" if offsets.scales is not None else "0",
                "config": json.dumps(cfg, sort_keys=True),
                "training": json.dumps(dict(training or {}), sort_keys=True, default=str)}
    return write_safetensors(path, concept_tensors(offsets, embedding), metadata)


def load_e4t_concept(path: str | Path, family: str | None = None, widths: Mapping[str, int] | None = None
                     ) -> E4TConceptData:
    """Read and validate a compact E4T concept. ``family`` and ``widths`` ({key: width} of the model's text
    encoders) are those of the model it will be applied to; a mismatch names the field, what the file holds and
    what the model needs. The offsets' modules are checked when they are applied (``WeightOffsets.attach``)."""
    from .embedding import Embedding, keys_for

    tensors, metadata = read_safetensors(path)
    f, fam = _fields_of(path, metadata, E4T_CONCEPT_FORMAT, E4T_CONCEPT_VERSION, "a compact E4T concept", family,
                        "metadata field 'family' is '{file}', but the model is '{model}'; this E4T concept was tuned "
                        "on another base model")
    identifier = f.str("identifier")
    class_word = f.str("class_word")
    rank = f.int("rank")
    num_vectors = f.int("num_vectors")
    targets, shapes, file_widths = f.json("targets"), f.json("target_shapes"), f.json("widths")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise f.error("targets", metadata["targets"][:80], "a non-empty JSON list of module paths")
    if not (isinstance(shapes, list) and len(shapes) == len(targets)
            and all(isinstance(s, list) and len(s) == 2 and all(isinstance(d, int) and d > 0 for d in s)
                    for s in shapes)):
        raise f.error("target_shapes", metadata["target_shapes"][:80], f"{len(targets)} [out, in] pairs")
    keys = keys_for(fam)
    if not isinstance(file_widths, dict) or sorted(file_widths) != sorted(keys):
        raise f.error("widths", metadata["widths"], f"a JSON object with the keys {list(keys)} ({fam})")
    for key, width in (widths or {}).items():
        if key in file_widths and file_widths[key] != width:
            raise FormatError(f"{path}: metadata field 'widths' gives '{key}' {file_widths[key]} wide, but the model's "
                              f"text encoder is {width} wide; the concept is for another base model")
    modulation = f.str("modulation", {"0", "1"}) == "1"
    check_bounds(path, "target_shapes", shapes)
    check_bounds(path, "widths", file_widths)
    # every tensor name and shape is checked against the metadata before the offsets are built from it
    expected = {}
    for name, (o, i) in zip(targets, shapes):
        expected[f"offset.{name}.up"] = (o, rank)
        expected[f"offset.{name}.down"] = (rank, i)
        if modulation:
            expected[f"scale.{name}"] = (o,)
    for key in keys:
        expected[f"embedding.{key}"] = (num_vectors, file_widths[key])
    check_shapes(path, expected, {k: tuple(t.shape) for k, t in tensors.items()}, "targets, modulation and widths")
    check_finite(path, tensors)
    config = E4TConfig(family=fam, word_dims=[file_widths[k] for k in keys], vision_dim=1, vision_layers=[0],
                       unet_dims=[1], targets=targets, target_shapes=shapes, identifier=identifier,
                       class_word=class_word, rank=rank)
    offsets = WeightOffsets(config)
    with torch.no_grad():
        for name, o in zip(targets, offsets.offsets):
            o.up.copy_(tensors[f"offset.{name}.up"])
            o.down.copy_(tensors[f"offset.{name}.down"])
    offsets.requires_grad_(False)
    if modulation:
        offsets.scales = [tensors[f"scale.{name}"].float() for name in targets]
    embedding = Embedding({k: tensors[f"embedding.{k}"].float() for k in keys}, fam, identifier, class_word,
                          {"method": "e4t"})
    return E4TConceptData(offsets, embedding, class_word, dict(metadata))


WEIGHT_DIFF_FORMAT = "boothkit.weight_diff"


def load_weight_diff(path: str | Path, family: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An E4T stock export (:func:`weight_diff_file`): {kohya layer name: W ∘ Δ} and the metadata; ``family`` is the
    model's. Any file of ``<layer>.diff`` keys under ``lora_unet_`` (ComfyUI's "diff" patches) reads the same."""
    tensors, meta = read_safetensors(path)
    fmt = meta.get("format")
    if fmt is not None:
        f = _Fields(path, meta)
        f.kind(WEIGHT_DIFF_FORMAT, 1, "e4t", "a weight-diff file")
        fam = f.str("family", set(FAMILIES))
        if family is not None and fam != family:
            raise FormatError(f"{path}: metadata field 'family' is {fam!r}, but the model is '{family}'; these weight "
                              f"diffs were made for another base model")
    bad = [k for k in tensors if not (k.startswith(UNET_PREFIX + "_") and k.endswith(".diff"))]
    if bad or not tensors:
        raise FormatError(f"{path}: tensors {bad[:3] or '(none)'} are not denoiser weight diffs; expected "
                          f"'{UNET_PREFIX}_<layer>.diff' keys")
    return {k[: -len(".diff")]: v for k, v in tensors.items()}, meta
