"""Files BoothKit writes and reads. Safetensors only; every file carries metadata that says what it is, and loading
checks it and names the file, the field, what was found and what was expected."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .instantbooth import FAMILIES, AdapterLayout, InstantBooth, InstantBoothConfig

INSTANTBOOTH_FORMAT = "boothkit.instantbooth"
INSTANTBOOTH_VERSION = 1


class FormatError(ValueError):
    """A file is not what BoothKit expects; the message says which file, which field, found and expected."""


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write atomically: a temp file in the same folder, then rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings; not strings: {bad}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix != ".safetensors":
        raise FormatError(f"{path}: BoothKit reads only .safetensors files (no pickles), got '{path.suffix}'")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from e
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def check_version(path, metadata: dict[str, str], supported: int) -> int:
    """The file's format version, refused when it is not an integer or newer than this BoothKit reads."""
    raw = metadata.get("version")
    try:
        version = int(raw)
    except (TypeError, ValueError):
        raise FormatError(f"{path}: metadata field 'version' is {raw!r}, expected an integer") from None
    if version > supported:
        raise FormatError(f"{path}: metadata field 'version' is {version}, expected <= {supported}: the file is "
                          f"newer than this BoothKit; upgrade")
    return version


class _Fields:
    """Typed access to string metadata with errors that name the file and the field."""

    def __init__(self, path, metadata: dict[str, str]):
        self.path, self.meta = path, metadata

    def error(self, name, found, expected) -> FormatError:
        return FormatError(f"{self.path}: metadata field '{name}' is {found!r}, expected {expected}")

    def str(self, name: str, choices=None) -> str:
        if name not in self.meta:
            raise self.error(name, None, "to be present" + (f" (one of {sorted(choices)})" if choices else ""))
        v = self.meta[name]
        if choices is not None and v not in choices:
            raise self.error(name, v, f"one of {sorted(choices)}")
        return v

    def int(self, name: str) -> int:
        v = self.str(name)
        try:
            out = int(v)
        except ValueError:
            raise self.error(name, v, "an integer") from None
        if out <= 0:
            raise self.error(name, v, "a positive integer")
        return out

    def float(self, name: str) -> float:
        v = self.str(name)
        try:
            return float(v)
        except ValueError:
            raise self.error(name, v, "a number") from None

    def kind(self, fmt: str, version: int, method: str, what: str) -> None:
        """The file is of format ``fmt`` (``what`` names it in the message), at most ``version``, for ``method``."""
        found = self.str("format")
        if found != fmt:
            raise self.error("format", found, f"'{fmt}' (this file is not {what})")
        check_version(self.path, self.meta, version)
        self.str("method", {method})

    def json(self, name: str):
        v = self.str(name)
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            raise self.error(name, v[:80], "JSON") from None


def load_checked(path, model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Load ``tensors`` into ``model`` (built from the file's metadata) after checking that the names and shapes are
    exactly those the metadata implies; the message names the file and the first differences."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{path}: tensors do not match the metadata's {what}; missing {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{'...' if len(unexpected) > 5 else ''}")
    for k, t in expected.items():
        if tensors[k].shape != t.shape:
            raise FormatError(f"{path}: tensor '{k}' has shape {tuple(tensors[k].shape)}, the metadata implies "
                              f"{tuple(t.shape)}")
    model.load_state_dict(tensors)
    return model


def instantbooth_metadata(config: InstantBoothConfig) -> dict[str, str]:
    c = config
    return {
        "format": INSTANTBOOTH_FORMAT,
        "version": str(INSTANTBOOTH_VERSION),
        "method": "instantbooth",
        "family": c.family,
        "ctx_dim": str(c.ctx_dim),
        "vision_global_dim": str(c.vision_global_dim),
        "vision_token_dim": str(c.vision_token_dim),
        "tokens_per_image": str(c.tokens_per_image),
        "image_size": str(c.image_size),
        "layout": json.dumps(c.layout.to_dict()),
        "identifier": c.identifier,
        "class_noun": c.class_noun,
        "alpha": repr(float(c.alpha)),
        "beta": repr(float(c.beta)),
        "crop_margin": repr(float(c.crop_margin)),
        "background": repr(float(c.background)),
        "adapters_on_uncond": "true" if c.adapters_on_uncond else "false",
        "training": json.dumps(c.extra, sort_keys=True, default=str),
    }


def save_instantbooth(path: str | Path, model: InstantBooth) -> Path:
    """Only the trained heads and adapters go into the file, never the base model."""
    return write_safetensors(path, model.state_dict(), instantbooth_metadata(model.config))


def instantbooth_config_from_metadata(path, metadata: dict[str, str]) -> InstantBoothConfig:
    f = _Fields(path, metadata)
    f.kind(INSTANTBOOTH_FORMAT, INSTANTBOOTH_VERSION, "instantbooth", "an InstantBooth file")
    lay = f.json("layout")
    try:
        layout = AdapterLayout(**{k: [int(x) for x in lay[k]] for k in ("dims", "heads", "levels", "depths")})
    except (KeyError, TypeError, ValueError) as e:
        raise f.error("layout", str(lay)[:80], f"dims/heads/levels/depths lists that fit together ({e})") from None
    try:
        extra = json.loads(metadata.get("training", "{}"))
    except json.JSONDecodeError:
        raise f.error("training", metadata["training"][:80], "JSON") from None
    family = f.str("family", set(FAMILIES))
    ctx_dim = f.int("ctx_dim")
    try:
        return InstantBoothConfig(
            vision_global_dim=f.int("vision_global_dim"), vision_token_dim=f.int("vision_token_dim"),
            tokens_per_image=f.int("tokens_per_image"), ctx_dim=ctx_dim, layout=layout, family=family,
            identifier=f.str("identifier"), class_noun=f.str("class_noun"), alpha=f.float("alpha"),
            beta=f.float("beta"), image_size=f.int("image_size"), crop_margin=f.float("crop_margin"),
            background=f.float("background"), extra=extra,
            # files written before the field existed: the adapters act on both halves of guidance
            adapters_on_uncond=metadata.get("adapters_on_uncond", "true").strip().lower() != "false")
    except ValueError as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{path}: inconsistent metadata: {e}") from None


def load_instantbooth(path: str | Path, family: str | None = None, ctx_dim: int | None = None) -> InstantBooth:
    """Load and validate an InstantBooth file. ``family``/``ctx_dim`` are those of the model it will patch."""
    tensors, metadata = read_safetensors(path)
    config = instantbooth_config_from_metadata(path, metadata)
    if family is not None and family != config.family:
        raise FormatError(f"{path}: this InstantBooth file was trained for base family '{config.family}', but the "
                          f"model to patch is '{family}'; load an InstantBooth file made for {family}.")
    if ctx_dim is not None and ctx_dim != config.ctx_dim:
        raise FormatError(f"{path}: metadata field 'ctx_dim' is {config.ctx_dim}, but the model's text encoder is "
                          f"{ctx_dim} wide; the file is for another base model.")
    return load_checked(path, InstantBooth(config), tensors, "layout")


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


def load_e4t(path: str | Path, family: str | None = None):
    """Load and validate an E4T file; ``family`` is that of the model it will tune."""
    from .e4t import E4T, E4TConfig

    tensors, metadata = read_safetensors(path)
    f = _Fields(path, metadata)
    f.kind(E4T_FORMAT, E4T_VERSION, "e4t", "an E4T file")
    fam = f.str("family", set(FAMILIES))
    if family is not None and family != fam:
        raise FormatError(f"{path}: this E4T file was pre-trained for base family '{fam}', but the model to tune is "
                          f"'{family}'; load an E4T file made for {family}.")
    raw = f.json("config")
    try:
        extra = json.loads(metadata.get("training", "{}"))
        config = E4TConfig(**{**raw, "extra": extra})
    except (TypeError, ValueError) as e:
        raise f.error("config", str(raw)[:80], f"the fields of an E4T configuration ({e})") from None
    return load_checked(path, E4T(config), tensors, "configuration")
