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
import logging
from collections.abc import Sequence
import re

log = logging.getLogger(__name__)



class FormatError(ValueError):
    """A file is not what BoothKit expects; the message says which file, which field, found and expected."""

    __module__ = "boothkit"  # its name in ComfyUI's error dialog, whatever folder the pack is cloned into


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


# ----------------------------------------------------------------------------------------------------------------
# output names


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A file-name stem with no directory parts and nothing a shell or ComfyUI's ``embedding:`` syntax trips on:
    letters, digits, '.', '_', '-'; no leading dot; at most 100 characters. Raises if nothing usable is left."""
    base = Path(str(name).replace("\\", "/")).name  # drops any directory part, "../" included
    if base.lower().endswith(".safetensors"):
        base = base[: -len(".safetensors")]
    clean = _UNSAFE.sub("_", base).strip("._-")[:100]
    if not clean or set(clean) <= {".", "_", "-"}:
        raise ValueError(f"output name {name!r} has no usable characters; use letters, digits, '.', '_' or '-'")
    if clean != name:
        log.info("output name %r sanitised to %r", name, clean)
    return clean


def output_paths(out_dir: str | Path, name: str, kinds: Sequence[str], overwrite: bool = False) -> dict[str, Path]:
    """Paths of the files a run writes: kind "embedding" -> ``<name>.safetensors`` (the name is what ComfyUI's
    ``embedding:<name>`` and A1111's prompt word use), others -> ``<name>_<kind>.safetensors``. Refuses existing
    files unless ``overwrite``; checked before training so a long run never ends in a refusal."""
    stem = safe_name(name)
    out_dir = Path(out_dir)
    paths = {k: out_dir / (f"{stem}.safetensors" if k == "embedding" else f"{stem}_{k}.safetensors") for k in kinds}
    for p in paths.values():
        if out_dir.resolve() not in p.resolve().parents:
            raise ValueError(f"output {p} would leave the output folder {out_dir}")
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass --overwrite (overwrite=True) to replace it, or choose another "
                                  f"--name")
    return paths
