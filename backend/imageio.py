"""Reading the user's images and masks from disk into [N, 3, H, W] / [N, 1, H, W] float tensors in [0, 1].

Masks are found beside their image as ``NAME_mask.png``; a missing mask means the whole image. Every problem names
the file it is about."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def list_images(source: str | Path | list) -> list[Path]:
    """Image files from a folder (sorted, masks excluded) or an explicit list of files."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        source = Path(source)
        if source.is_dir():
            paths = sorted(p for p in source.iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask"))
        else:
            paths = [source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
    return paths


# Image sizes, read from the file's header before anything is decoded, so a small file that claims a huge canvas (an
# "image bomb") costs nothing:
# - above MAX_PIXELS (8192x8192, 67 MP) an image is refused;
# - above MAX_KEPT (4096x4096, 16.8 MP; a 48 MP phone photo, say) it is reduced on load to fit within MAX_KEPT,
#   keeping its aspect (JPEGs are decoded at a reduced scale directly), so at most ~200 MB of float RGB is kept.
MAX_PIXELS = 8192 * 8192
MAX_KEPT = 4096 * 4096
MIN_SIDE = 8  # a photo of the subject smaller than this carries nothing to encode (a 1x1 one gave NaN features)


def _open_checked(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL warns above 89 MP; the limit below is ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own guard, above 2x its MAX_IMAGE_PIXELS
        raise ValueError(f"{path}: image too large to decode ({e}); the limit is {MAX_PIXELS / 1e6:.0f} MP "
                         f"(8192x8192)") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise ValueError(f"{path}: image is {w}x{h} ({w * h / 1e6:.1f} MP), above the limit of {MAX_PIXELS / 1e6:.1f} "
                         f"MP (8192x8192); downscale it first")
    if w < 1 or h < 1:
        im.close()
        raise ValueError(f"{path}: image is {w}x{h}, expected at least 1x1")
    return im


def kept_size(w: int, h: int) -> tuple[int, int]:
    """The size an image of w x h is kept at: itself up to MAX_KEPT pixels, else scaled down to fit, aspect kept."""
    if w * h <= MAX_KEPT:
        return w, h
    k = (MAX_KEPT / (w * h)) ** 0.5
    return max(1, int(w * k)), max(1, int(h * k))


def _reduced(im, path: Path):
    """``im`` reduced on load to kept_size (said in the log); 16-bit greyscale stays 16-bit (as "I")."""
    from PIL import Image

    w, h = im.size
    target = kept_size(w, h)
    if target == (w, h):
        return im
    if im.format == "JPEG":
        im.draft("RGB" if im.mode not in ("L", "RGB") else im.mode, target)  # DCT scaling: decodes at >= target
    if im.mode.startswith("I;16"):
        im = im.convert("I")
    elif im.mode in ("P", "1", "PA", "LA", "La", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
    log.info("%s is %dx%d (%.1f MP); reduced on load to %dx%d (the limit kept is %.1f MP)", path, w, h, w * h / 1e6,
             *target, MAX_KEPT / 1e6)
    return im.resize(target, Image.LANCZOS, reducing_gap=3.0)


def _to_float(im, mode: str, sixteen: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(pixels in [0, 1] as float32 HxWxC (or HxW for "L"), alpha in [0, 1] or None) with the bit depth respected:
    16-bit and 32-bit greyscale ("I;16", "I") and float ("F") images are scaled, not clipped at 255."""
    alpha = None
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            top = 1.0 if arr.size == 0 or np.nanmax(arr) <= 1.0 else float(np.nanmax(arr))
        elif sixteen or im.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            top = 65535.0
        else:
            top = 255.0
        grey = np.clip(np.nan_to_num(arr / top), 0.0, 1.0).astype(np.float32)
        return (grey if mode == "L" else np.repeat(grey[..., None], 3, axis=-1)), None
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info) or im.mode in ("PA", "LA", "La"):
        rgba = im.convert("RGBA")
        arr = np.asarray(rgba, dtype=np.float32) / 255.0
        alpha = arr[..., 3]
        rgb = arr[..., :3]
        if mode == "L":
            return np.asarray(rgba.convert("L"), dtype=np.float32) / 255.0, alpha
        return rgb, alpha
    return np.asarray(im.convert(mode), dtype=np.float32) / 255.0, None


def read_image_alpha(path: Path, mode: str = "RGB") -> tuple[torch.Tensor, torch.Tensor | None]:
    """An image as [3, H, W] ("RGB") or [1, H, W] ("L") in [0, 1], and its alpha [1, H, W] when it has one that is
    not fully opaque. The size is checked before decoding: refused above MAX_PIXELS, reduced on load above
    MAX_KEPT."""
    path = Path(path)
    im = _open_checked(path)
    try:
        with im:
            sixteen = im.mode.startswith("I;16")
            small = _reduced(im, path)
            arr, alpha = _to_float(small, mode, sixteen)
    except (OSError, ValueError, SyntaxError) as e:  # truncated data and decoder errors surface here
        raise ValueError(f"{path}: cannot read the image ({e})") from None
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
    if alpha is not None and float(alpha.min()) >= 1.0:
        alpha = None
    return t, None if alpha is None else torch.from_numpy(np.ascontiguousarray(alpha))[None]


def read_image(path: Path, mode: str = "RGB") -> torch.Tensor:
    return read_image_alpha(path, mode)[0]


def mask_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.stem + "_mask.png")


def read_mask(image_path: Path, size: tuple[int, int]) -> torch.Tensor | None:
    path = mask_path(image_path)
    if not path.exists():
        return None
    m = read_image(path, "L")
    if tuple(m.shape[-2:]) != tuple(size):
        raise ValueError(f"{path}: mask is {m.shape[-1]}x{m.shape[-2]} but its image is {size[1]}x{size[0]} "
                         f"({image_path.name}); masks must have their image's size")
    return (m > 0.5).float()


_ALPHA_SAID: set = set()


def read_image_and_mask(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An image and its mask: ``NAME_mask.png`` beside it, else the image's own alpha channel (where it is not fully
    opaque; said in the log), else None (the whole image)."""
    path = Path(path)
    img, alpha = read_image_alpha(path)
    if min(img.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"{path}: image is {img.shape[-1]}x{img.shape[-2]}, expected at least {MIN_SIDE}x{MIN_SIDE} "
                         f"pixels of the subject")
    m = read_mask(path, tuple(img.shape[-2:]))
    if m is None and alpha is not None:
        if path.parent not in _ALPHA_SAID:  # said once per folder (a training folder may hold thousands)
            _ALPHA_SAID.add(path.parent)
            log.info("%s: no %s; using the image's alpha channel as the subject's mask (so for every image in %s "
                     "with transparency and no mask file)", path, mask_path(path).name, path.parent)
        m = (alpha > 0.5).float()
        if not bool(m.any()):
            raise ValueError(f"{path}: its alpha channel (used as the mask, no {mask_path(path).name}) is fully "
                             f"transparent; expected the subject to be opaque")
    return img, m


def read_images_and_masks(source) -> tuple[torch.Tensor, torch.Tensor]:
    """All images at the first image's size (others are resized, with a note in the log); masks default to ones."""
    paths = list_images(source)
    images, masks = [], []
    size = None
    for p in paths:
        img, m = read_image_and_mask(p)
        if m is None:
            m = torch.ones_like(img[:1])
        if size is None:
            size = tuple(img.shape[-2:])
        elif tuple(img.shape[-2:]) != size:
            log.info("%s is %dx%d; resized to %dx%d like %s", p, img.shape[-1], img.shape[-2], size[1], size[0],
                     paths[0].name)
            img = torch.nn.functional.interpolate(img[None], size=size, mode="bilinear", antialias=True)[0]
            m = (torch.nn.functional.interpolate(m[None], size=size, mode="nearest")[0] > 0.5).float()
        images.append(img)
        masks.append(m)
    return torch.stack(images), torch.stack(masks)


def save_png(images: torch.Tensor, path: str | Path) -> Path:
    """[3, H, W] or [N, 3, H, W] in [0, 1] -> PNG (a batch is laid out in one row). Refuses non-finite pixels (a
    NaN image would be written as black); written atomically with the umask's mode."""

    from PIL import Image

    from .files import NonFiniteError, atomic_write

    path = Path(path)
    if images.ndim == 4:
        images = torch.cat(list(images), dim=-1)
    if not bool(torch.isfinite(images).all()):
        n = int((~torch.isfinite(images)).sum())
        raise NonFiniteError(f"{path}: the image to write holds {n} NaN or infinite value(s) of {images.numel()}; "
                             f"nothing written (the model or its settings produced non-finite output)")
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (images.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
    return atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
