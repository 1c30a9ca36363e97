"""LoRA for stage 2 of quick-tune: low-rank weight offsets attached to a denoiser by forward hooks.

The base modules are never changed: a hook adds ``multiplier · (α / rank) · up(down(x))`` to a module's output, so
``detach()`` (or leaving the ``with`` block) restores the exact original outputs and the base weights stay
bit-identical the whole time.

Files follow kohya-ss/sd-scripts' contract (``networks/lora.py``), which stock ComfyUI's LoraLoader and A1111 read:
a key is ``<prefix>_<module path with '.' -> '_'>`` plus ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``;
the prefix is ``lora_unet`` for the denoiser. Module paths are those of the root module the host hands us (diffusers'
``UNet2DConditionModel`` paths in the diffusers host; ComfyUI maps those and its own ``input_blocks...`` paths).
Which modules get a LoRA is kohya's rule too: every ``Linear`` and 1x1 ``Conv2d`` inside a transformer container
(``Transformer2DModel``, ComfyUI's ``SpatialTransformer``), plus, with ``conv_rank > 0``, every 3x3 ``Conv2d`` (and the
Linear/1x1 layers) inside the ResNet/up/downsample containers (kohya's ``conv_dim``, "LoCon").

Pure torch: the host hands a root ``nn.Module``; nothing here imports diffusers or ComfyUI.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .files import FormatError, check_finite, check_version, read_safetensors, write_safetensors

log = logging.getLogger(__name__)

LORA_FORMAT = "boothkit.lora"
LORA_VERSION = 1
UNET_PREFIX = "lora_unet"

# kohya's UNET_TARGET_REPLACE_MODULE, plus the same container's name in ComfyUI's ldm UNet
ATTENTION_CONTAINERS = ("Transformer2DModel", "SpatialTransformer")
# kohya's UNET_TARGET_REPLACE_MODULE_CONV2D_3X3, plus ComfyUI's names for the same blocks
CONV_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample")

_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def kohya_name(prefix: str, module_path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return f"{prefix}_{module_path.replace('.', '_')}" if module_path else prefix


@dataclass(frozen=True)
class LayerSpec:
    """The shape of one adapted layer: enough to build its LoRA pair and to check it fits a module."""
    kind: str  # "linear" | "conv"
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def of(cls, module: nn.Module) -> LayerSpec:
        if isinstance(module, nn.Linear):
            return cls("linear", module.in_features, module.out_features)
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or not isinstance(module.padding, tuple):
                raise ValueError(f"LoRA supports ungrouped Conv2d with numeric padding, got {module}")
            return cls("conv", module.in_channels, module.out_channels, tuple(module.kernel_size),
                       tuple(module.stride), tuple(module.padding), tuple(module.dilation))
        raise ValueError(f"LoRA supports nn.Linear and nn.Conv2d, got {type(module).__name__}")

    def fits(self, module: nn.Module) -> bool:
        try:
            other = LayerSpec.of(module)
        except ValueError:
            return False
        # stride/padding are not stored in files; only what the weights determine must match
        return (other.kind, other.in_features, other.out_features) == (self.kind, self.in_features,
                                                                       self.out_features) and \
            (self.kind == "linear" or other.kernel_size == self.kernel_size)


def find_targets(root: nn.Module, conv: bool = False, containers: tuple[str, ...] = ATTENTION_CONTAINERS,
                 conv_containers: tuple[str, ...] = CONV_CONTAINERS) -> dict[str, tuple[nn.Module, bool]]:
    """Modules kohya's LoRA adapts, in ``named_modules`` order: path -> (module, is_3x3_conv).

    Linear and 1x1 Conv2d inside ``containers``; with ``conv`` also everything inside ``conv_containers``, where the
    3x3 convolutions are flagged (they take ``conv_rank``)."""
    wanted = tuple(containers) + (tuple(conv_containers) if conv else ())
    out: dict[str, tuple[nn.Module, bool]] = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in wanted:
            continue
        for child_name, child in module.named_modules():
            if not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            path = f"{name}.{child_name}" if name and child_name else (name or child_name)
            is_big_conv = isinstance(child, nn.Conv2d) and tuple(child.kernel_size) != (1, 1)
            if is_big_conv and not conv:
                continue
            if isinstance(child, nn.Conv2d) and (child.groups != 1 or isinstance(child.padding, str)):
                continue
            out.setdefault(path, (child, is_big_conv))
    return out


class LoRAPair(nn.Module):
    """One low-rank offset ``ΔW = up @ down`` for a Linear or Conv2d layer, scaled by α / rank."""

    def __init__(self, spec: LayerSpec, rank: int, alpha: float, device=None, dtype=torch.float32):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        self.spec, self.rank, self.alpha = spec, int(rank), float(alpha)
        if spec.kind == "linear":
            down_shape, up_shape = (rank, spec.in_features), (spec.out_features, rank)
        else:
            down_shape = (rank, spec.in_features, *spec.kernel_size)
            up_shape = (spec.out_features, rank, 1, 1)
        self.down = nn.Parameter(torch.empty(down_shape, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(up_shape, device=device, dtype=dtype))
        # kohya's init: down like nn.Linear's default, up zero, so a fresh LoRA changes nothing
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor, module: nn.Module | None = None, scale: float | None = None) -> torch.Tensor:
        """The offset ``scale · up(down(x))`` (``scale`` defaults to α / rank); a conv takes stride/padding from the
        module it is attached to (files do not store them). Few kernels: this runs for every adapted layer."""
        scale = self.scale if scale is None else scale
        down = self.down if self.down.dtype == x.dtype else self.down.to(x.dtype)
        up = self.up if self.up.dtype == x.dtype else self.up.to(x.dtype)
        if self.spec.kind == "linear":
            out = F.linear(F.linear(x, down), up)
        else:
            s = module if isinstance(module, nn.Conv2d) else self.spec
            out = F.conv2d(F.conv2d(x, down, stride=s.stride, padding=s.padding, dilation=s.dilation), up)
        return out if scale == 1 else out * scale

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's shape (what a weight patcher such as ComfyUI's adds)."""
        w = (self.up.flatten(1) @ self.down.flatten(1)) * self.scale
        if self.spec.kind == "linear":
            return w
        return w.reshape(self.spec.out_features, self.spec.in_features, *self.spec.kernel_size)


class LoRA(nn.Module):
    """A set of LoRA pairs keyed by kohya name (``lora_unet_...``). Attach it to a root module with ``attach``."""

    def __init__(self, specs: Mapping[str, LayerSpec], ranks: Mapping[str, int], alphas: Mapping[str, float],
                 device=None, dtype=torch.float32):
        super().__init__()
        if not specs:
            raise ValueError("a LoRA needs at least one layer; the root module has no layer kohya's rule selects")
        self.pairs = nn.ModuleDict({name: LoRAPair(spec, ranks[name], alphas[name], device, dtype)
                                    for name, spec in specs.items()})
        self.multiplier = 1.0

    @classmethod
    def for_model(cls, root: nn.Module, rank: int = 4, alpha: float | None = None, conv_rank: int = 0,
                  conv_alpha: float | None = None, prefix: str = UNET_PREFIX, device=None,
                  containers: tuple[str, ...] = ATTENTION_CONTAINERS,
                  conv_containers: tuple[str, ...] = CONV_CONTAINERS) -> LoRA:
        """A fresh LoRA over the layers kohya's rule selects in ``root``. ``alpha`` defaults to ``rank`` (scale 1)."""
        alpha = float(rank if alpha is None else alpha)
        conv_alpha = float(conv_rank if conv_alpha is None else conv_alpha)
        specs, ranks, alphas = {}, {}, {}
        for path, (module, big_conv) in find_targets(root, conv_rank > 0, containers, conv_containers).items():
            name = kohya_name(prefix, path)
            specs[name] = LayerSpec.of(module)
            ranks[name], alphas[name] = (conv_rank, conv_alpha) if big_conv else (rank, alpha)
        if device is None:
            device = next((p.device for p in root.parameters()), None)
        return cls(specs, ranks, alphas, device=device)

    def names(self) -> list[str]:
        return list(self.pairs.keys())

    def resolve(self, root: nn.Module, prefix: str = UNET_PREFIX) -> dict[str, nn.Module]:
        """kohya name -> module of ``root``; raises naming every LoRA layer that has no matching module."""
        by_name = {kohya_name(prefix, path): m for path, m in root.named_modules()}
        missing, wrong = [], []
        out = {}
        for name, pair in self.pairs.items():
            module = by_name.get(name)
            if module is None:
                missing.append(name)
            elif not pair.spec.fits(module):
                wrong.append(f"{name} ({pair.spec.kind} {pair.spec.in_features}->{pair.spec.out_features} vs "
                             f"{module})")
            else:
                out[name] = module
        if missing or wrong:
            raise ValueError(f"this LoRA does not fit the model: {len(missing)} layer(s) not found "
                             f"{missing[:3]}{'...' if len(missing) > 3 else ''}, {len(wrong)} of another shape "
                             f"{wrong[:3]}{'...' if len(wrong) > 3 else ''}; it was made for another base model")
        return out

    @contextmanager
    def attach(self, root: nn.Module, prefix: str = UNET_PREFIX) -> Iterator[LoRA]:
        """Add the LoRA's offsets to ``root``'s outputs inside the ``with`` block; nothing of ``root`` changes."""
        handles = []
        try:
            for name, module in self.resolve(root, prefix).items():
                handles.append(module.register_forward_hook(self._hook(self.pairs[name])))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, pair: LoRAPair):
        def hook(module, args, output):
            if self.multiplier == 0:
                return output
            return output + pair(args[0], module, pair.scale * self.multiplier)
        return hook

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """kohya name -> ΔW (multiplier applied), for hosts that patch weights instead of hooking outputs."""
        with torch.no_grad():
            return {name: pair.delta_weight() * self.multiplier for name, pair in self.pairs.items()}

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for name, pair in self.pairs.items():
            down, up = pair.down.detach(), pair.up.detach()
            out[f"{name}.lora_down.weight"] = down.to(dtype) if dtype else down
            out[f"{name}.lora_up.weight"] = up.to(dtype) if dtype else up
            out[f"{name}.alpha"] = torch.tensor(pair.alpha, dtype=dtype or torch.float32)
        return out

    @classmethod
    def from_kohya_state_dict(cls, tensors: Mapping[str, torch.Tensor], source: str = "LoRA file") -> LoRA:
        names = sorted({k[: -len(s)] for k in tensors for s in _SUFFIXES if k.endswith(s)})
        unknown = sorted(k for k in tensors if not any(k.endswith(s) for s in _SUFFIXES))
        if unknown:
            raise FormatError(f"{source}: keys that are not kohya LoRA keys (.lora_down.weight/.lora_up.weight/"
                              f".alpha): {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
        if not names:
            raise FormatError(f"{source}: no LoRA layers in the file")
        specs, ranks, alphas = {}, {}, {}
        for name in names:
            try:
                down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            except KeyError as e:
                raise FormatError(f"{source}: layer '{name}' lacks {e.args[0]}") from None
            rank = down.shape[0]
            if down.ndim == 2 and up.ndim == 2 and up.shape[1] == rank:
                specs[name] = LayerSpec("linear", down.shape[1], up.shape[0])
            elif down.ndim == 4 and up.ndim == 4 and up.shape[1] == rank and tuple(up.shape[2:]) == (1, 1):
                k = tuple(down.shape[2:])
                specs[name] = LayerSpec("conv", down.shape[1], up.shape[0], k, padding=(k[0] // 2, k[1] // 2))
            else:
                raise FormatError(f"{source}: layer '{name}' has lora_down {tuple(down.shape)} and lora_up "
                                  f"{tuple(up.shape)}, expected [r, in] + [out, r] or [r, in, k, k] + [out, r, 1, 1]")
            ranks[name] = rank
            a = tensors.get(f"{name}.alpha")
            if a is not None and (a.numel() != 1 or not bool(torch.isfinite(a.float()).all())):
                raise FormatError(f"{source}: tensor '{name}.alpha' is {a.flatten()[:3].tolist()} (shape "
                                  f"{tuple(a.shape)}), expected one finite number")
            alphas[name] = float(a.item()) if a is not None else float(rank)  # kohya: no alpha means scale 1
        lora = cls(specs, ranks, alphas)
        with torch.no_grad():
            for name, pair in lora.pairs.items():
                pair.down.copy_(tensors[f"{name}.lora_down.weight"].float())
                pair.up.copy_(tensors[f"{name}.lora_up.weight"].float())
        return lora

    def rank_alpha_summary(self) -> tuple[int, float]:
        """(most common rank, its alpha): what kohya's ss_network_dim / ss_network_alpha report."""
        pairs = list(self.pairs.values())
        ranks = [p.rank for p in pairs if p.spec.kernel_size == (1, 1)] or [p.rank for p in pairs]
        rank = max(set(ranks), key=ranks.count)
        alpha = next(p.alpha for p in pairs if p.rank == rank)
        return rank, alpha

    def conv_rank_alpha(self) -> tuple[int, float] | None:
        convs = [p for p in self.pairs.values() if p.spec.kernel_size != (1, 1)]
        return (convs[0].rank, convs[0].alpha) if convs else None


# ----------------------------------------------------------------------------------------------------------------
# files

ARCHITECTURES = {  # modelspec.architecture of the base family (SAI model spec, as kohya writes it)
    "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base",
    "toy": "boothkit-toy",
}
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "toy": "boothkit_toy"}


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """kohya's ``precalculate_safetensors_hashes``: sshs_model_hash and sshs_legacy_hash over the tensors plus the
    ss_* metadata, the hashes sd-webui-additional-networks indexes files by."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n:]).hexdigest()
    b = io.BytesIO(data)
    b.seek(0x100000)
    legacy_hash = hashlib.sha256(b.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash


def ss_metadata(family: str, training: Mapping[str, object], prediction_type: str = "epsilon") -> dict[str, str]:
    """The kohya-style ss_* keys common to LoRA and embedding files (strings only)."""
    t = dict(training)
    meta = {
        "ss_base_model_version": BASE_MODEL_VERSIONS.get(family, family),
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_sd_model_name": str(t.get("base_model", "")),
        "ss_output_name": str(t.get("name", "")),
        "ss_num_train_images": str(t.get("num_images", "")),
        "ss_num_reg_images": str(t.get("num_class_images", 0)),
        "ss_resolution": str(t.get("resolution", "")),
        "ss_seed": str(t.get("seed", "")),
        "ss_mixed_precision": str(t.get("mixed_precision", "no")),
        "ss_gradient_checkpointing": str(bool(t.get("gradient_checkpointing", False))),
        "ss_optimizer": "torch.optim.AdamW",
        "ss_lr_scheduler": "constant",
        "ss_training_comment": "BoothKit two-stage quick-tune (textual inversion, then DreamBooth-style "
                               "fine-tuning without prior preservation)",
    }
    if "started_at" in t:
        meta["ss_training_started_at"] = str(t["started_at"])
    if "finished_at" in t:
        meta["ss_training_finished_at"] = str(t["finished_at"])
    return meta


def modelspec_metadata(family: str, kind: str, title: str, resolution: object, prediction_type: str) -> dict[str, str]:
    arch = ARCHITECTURES.get(family, family)
    if family == "sd2" and prediction_type == "v_prediction":
        arch = "stable-diffusion-v2-768-v"
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/{kind}",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    if resolution:
        meta["modelspec.resolution"] = f"{resolution}x{resolution}"
    return meta


def lora_metadata(lora: LoRA, family: str, identifier: str, training: Mapping[str, object],
                  prediction_type: str = "epsilon") -> dict[str, str]:
    rank, alpha = lora.rank_alpha_summary()
    conv = lora.conv_rank_alpha()
    net_args = {"conv_dim": str(conv[0]), "conv_alpha": repr(conv[1])} if conv else {}
    meta: dict[str, str] = {
        "format": LORA_FORMAT,
        "version": str(LORA_VERSION),
        "method": "quicktune",
        "family": family,
        "identifier": identifier,
        "prefix": UNET_PREFIX,
        "rank": str(rank),
        "alpha": repr(float(alpha)),
        "num_layers": str(len(lora.pairs)),
        "training": json.dumps(dict(training), sort_keys=True, default=str),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": repr(float(alpha)),
    }
    if net_args:  # kohya writes ss_network_args only when there are network args
        meta["ss_network_args"] = json.dumps(net_args)
    meta.update(ss_metadata(family, training, prediction_type))
    meta["ss_unet_lr"] = str(training.get("stage2_lr", ""))
    meta["ss_learning_rate"] = meta["ss_unet_lr"]
    meta["ss_text_encoder_lr"] = "0"
    meta["ss_network_train_unet_only"] = "True"
    meta["ss_max_train_steps"] = str(training.get("stage2_steps", ""))
    meta["ss_steps"] = str(training.get("stage2_steps_done", training.get("stage2_steps", "")))
    meta.update(modelspec_metadata(family, "lora", str(training.get("name", identifier)),
                                   training.get("resolution"), prediction_type))
    return meta


@dataclass
class LoRATensors:
    """A LoRA file's content in memory: what a host passes from the node that made it to the node that saves it
    (ComfyUI type ``BOOTHKIT_LORA``). ``tensors`` have keys stock loaders map (kohya's ``<layer>.lora_down.weight`` /
    ``.lora_up.weight`` / ``.alpha``; a method with whole-weight offsets adds ComfyUI's ``<layer>.diff``), ``metadata``
    is the file's string metadata, complete. Saving writes both as they are."""
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        return write_safetensors(path, self.tensors, self.metadata)


def _renamed(key: str, names: Mapping[str, str]) -> str:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            layer = key[: -len(suffix)]
            return names.get(layer, layer) + suffix
    return key


def lora_tensors(lora: LoRA, family: str, identifier: str, training: Mapping[str, object] | None = None,
                 prediction_type: str = "epsilon", dtype: torch.dtype | None = None,
                 names: Mapping[str, str] | None = None) -> LoRATensors:
    """The file content of ``lora``: kohya tensors and metadata with kohya's content hashes. ``names`` renames layers
    (e.g. a host's own module paths to the diffusers paths kohya files use)."""
    tensors = lora.kohya_state_dict(dtype)
    if names:
        tensors = {_renamed(k, names): v for k, v in tensors.items()}
    meta = lora_metadata(lora, family, identifier, training or {}, prediction_type)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(tensors, meta)
    return LoRATensors(tensors, meta)


def save_lora(path: str | Path, lora: LoRA, family: str, identifier: str, training: Mapping[str, object] | None = None,
              prediction_type: str = "epsilon", overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write a kohya-format LoRA with kohya ss_* metadata plus BoothKit's format/version/method/family/identifier."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    return lora_tensors(lora, family, identifier, training, prediction_type, dtype).save(path, overwrite=True)


@dataclass
class LoRAFile:
    lora: LoRA
    metadata: dict[str, str]

    @property
    def family(self) -> str | None:
        return self.metadata.get("family")

    @property
    def identifier(self) -> str | None:
        return self.metadata.get("identifier")


def load_lora(path: str | Path, family: str | None = None) -> LoRAFile:
    """Read a LoRA written by ``save_lora`` (or any kohya-format LoRA of ``lora_unet_`` layers).

    ``family`` is that of the model it will be attached to; a BoothKit file made for another family is refused."""
    tensors, meta = read_safetensors(path)
    check_finite(path, tensors)
    fmt = meta.get("format")
    if fmt is None and meta.get("ss_network_module", "").endswith("lora"):
        log.info("%s: a kohya LoRA without BoothKit metadata; reading its layers only", path)
    elif fmt != LORA_FORMAT:
        raise FormatError(f"{path}: metadata field 'format' is {fmt!r}, expected '{LORA_FORMAT}' (or a kohya LoRA "
                          f"with ss_network_module)")
    else:
        check_version(path, meta, LORA_VERSION)
        if family is not None and meta.get("family") != family:
            raise FormatError(f"{path}: metadata field 'family' is {meta.get('family')!r}, but the model is "
                              f"'{family}'; this LoRA was trained for another base model")
    lora = LoRA.from_kohya_state_dict(tensors, source=str(path))
    bad = [n for n in lora.names() if not n.startswith(UNET_PREFIX + "_")]
    if bad:
        raise FormatError(f"{path}: layers {bad[:3]} are not denoiser layers (prefix '{UNET_PREFIX}_'); text-encoder "
                          f"LoRAs are not supported by quick-tune")
    return LoRAFile(lora, meta)
