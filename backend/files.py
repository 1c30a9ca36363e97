"""Files BoothKit writes and reads. Safetensors only; every file carries metadata that says what it is, and loading
checks it and names the file, the field, what was found and what was expected."""
from __future__ import annotations

import json
import math
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


class NonFiniteError(ValueError):
    """Tensors about to be written (or just read) hold NaN or infinity; the message names the file and the tensors."""


# Bounds on what a file's metadata may ask for, checked before anything is built from it: no base model BoothKit
# patches has a width, count or rank above MAX_DIM, or more than MAX_ITEMS blocks/targets/layers
MAX_DIM = 1 << 16
MAX_ITEMS = 10_000


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or ±inf."""
    return [k for k, v in tensors.items() if torch.is_tensor(v) and (v.is_floating_point() or v.is_complex())
            and v.numel() and not bool(torch.isfinite(v).all())]


def all_finite(tensors) -> bool:
    """Whether every tensor of ``tensors`` is finite, read with one device sync (the guards' per-step check)."""
    return bool(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all())


def check_finite(path, tensors: dict[str, torch.Tensor]) -> None:
    bad = nonfinite(tensors)
    if bad:
        raise NonFiniteError(f"{path}: {len(bad)} tensor(s) hold NaN or infinity ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}); expected finite values")


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the umask (mkstemp's 0o600 is for secrets)."""
    return 0o666 & ~_umask()


def refuse_existing(path: str | Path, overwrite: bool, option: str = "--overwrite") -> Path:
    """``path``, refused when it exists (unless ``overwrite``) or when a file stands where one of its folders goes;
    checked before the work that writes it."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{path}: cannot write under {parent}, which is a file, not a folder")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass {option} to replace it, or choose another name")
    return path


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write atomically: a temp file in the same folder, then rename, so a crash never leaves half a file. Refuses
    non-finite tensors (nothing BoothKit writes may hold NaN or infinity); the file gets the umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings; not strings: {bad}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    check_finite(path, tensors)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write(path: Path, write) -> Path:
    """``write(tmp)`` into a temp file beside ``path``, then one rename: a crash or an error never leaves half a file
    (and never touches an existing ``path``). The file gets the umask's mode (mkstemp's 0600 is for secrets)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read(path: str | Path, read):
    """``read(safe_open handle)`` on a .safetensors file, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix != ".safetensors":
        raise FormatError(f"{path}: BoothKit reads only .safetensors files (no pickles), got '{path.suffix}'")
    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from e


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return _read(path, lambda f: ({k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}))


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read_shapes(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata from the header alone, loading no tensor."""
    return _read(path, lambda f: ({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}))


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

    def int(self, name: str, hi: int = MAX_DIM) -> int:
        v = self.str(name)
        try:
            out = int(v)
        except ValueError:
            raise self.error(name, v, "an integer") from None
        if out <= 0:
            raise self.error(name, v, "a positive integer")
        if out > hi:
            raise self.error(name, v, f"a positive integer of at most {hi}")
        return out

    def float(self, name: str, default: float | None = None) -> float:
        """A finite number; ``default`` (when given) for files written before the field existed."""
        if default is not None and name not in self.meta:
            return default
        v = self.str(name)
        try:
            out = float(v)
        except ValueError:
            raise self.error(name, v, "a number") from None
        if not math.isfinite(out):
            raise self.error(name, v, "a finite number")
        return out

    def flag(self, name: str, default: bool) -> bool:
        """A ``true``/``false`` field; ``default`` for files written before the field existed."""
        if name not in self.meta:
            return default
        v = self.meta[name].strip().lower()
        if v not in ("true", "false"):
            raise self.error(name, self.meta[name], "true or false")
        return v == "true"

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


def check_bounds(path, name: str, value, hi: int = MAX_DIM, items: int = MAX_ITEMS) -> None:
    """Every number in a metadata value (a JSON tree) finite and at most ``hi`` in size, every list at most ``items``
    long: checked before a module is built from it."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        if isinstance(v, (int, float)):
            if not math.isfinite(v) or abs(v) > hi:
                raise FormatError(f"{path}: metadata field '{name}' holds {v!r}, expected finite numbers of at most "
                                  f"{hi} in size")
        elif isinstance(v, (list, tuple, dict)):
            if len(v) > items:
                raise FormatError(f"{path}: metadata field '{name}' holds a list of {len(v)} items, expected at most "
                                  f"{items}")
            stack.extend(v.values() if isinstance(v, dict) else v)


def expected_shapes(build) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict ``build()`` would make, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: tuple(t.shape) for k, t in build().state_dict().items()}


def check_shapes(path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{path}: tensors do not match the metadata's {what}; missing {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{'...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if tuple(found[k]) != shape:
            raise FormatError(f"{path}: tensor '{k}' has shape {tuple(found[k])}, the metadata's {what} implies "
                              f"{shape}")


def load_checked(path, build, tensors: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Build the module the file's metadata describes (``build()``) and load ``tensors`` into it — after checking,
    on a meta-device copy that costs no memory, that the names and shapes are exactly those the metadata implies,
    and that every tensor is finite; the message names the file and the first difference. A lying metadata field
    therefore never allocates more than the file's own tensors."""
    built = build if isinstance(build, torch.nn.Module) else None  # a caller that built the module itself
    expected = ({k: tuple(t.shape) for k, t in built.state_dict().items()} if built is not None
                else expected_shapes(build))
    check_shapes(path, expected, {k: tuple(v.shape) for k, v in tensors.items()}, what)
    check_finite(path, tensors)
    model = built if built is not None else build()
    model.load_state_dict(tensors)
    return model


def load_module(path, config_from_metadata, build, what: str, check=None) -> torch.nn.Module:
    """The one way a module file is loaded: header (shapes, metadata) without the tensors; the configuration from
    the metadata (``config_from_metadata(metadata)``, bounded); ``check(config)`` (e.g. the base model's family);
    the shapes the configuration implies against the header's (meta device, no memory); then the tensors, checked
    finite; then the module ``build(config)`` is built and loaded."""
    shapes, metadata = read_shapes(path)
    config = config_from_metadata(metadata)
    if check is not None:
        check(config)
    try:  # on the meta device: a lying dimension costs nothing here
        expected = expected_shapes(lambda: build(config))
    except (ValueError, TypeError, RuntimeError, ArithmeticError, IndexError, KeyError) as e:
        if isinstance(e, FormatError):
            raise
        msg = " ".join(str(e).split())[:200]
        raise FormatError(f"{path}: the metadata's {what} does not describe a module that can be built ({msg})") \
            from None
    check_shapes(path, expected, shapes, what)
    tensors, _ = read_safetensors(path)
    check_finite(path, tensors)
    model = build(config)
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
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"output folder {out_dir}: {folder} is a file, not a folder")
    paths = {k: out_dir / (f"{stem}.safetensors" if k == "embedding" else f"{stem}_{k}.safetensors") for k in kinds}
    for p in paths.values():
        if out_dir.resolve() not in p.resolve().parents:
            raise ValueError(f"output {p} would leave the output folder {out_dir}")
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass --overwrite (overwrite=True) to replace it, or choose another "
                                  f"--name")
    return paths
