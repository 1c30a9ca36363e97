"""Reading the user's images and masks from disk into [N, 3, H, W] / [N, 1, H, W] float tensors in [0, 1].

Masks are found beside their image as ``NAME_mask.png``; a missing mask means the whole image. Every problem names
the file it is about."""
from __future__ import annotations

import logging
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


def read_image(path: Path, mode: str = "RGB") -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None
    t = torch.from_numpy(arr.copy())
    return t.permute(2, 0, 1) if t.ndim == 3 else t[None]


def mask_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.stem + "_mask.png")


def read_mask(image_path: Path, size: tuple[int, int]) -> torch.Tensor | None:
    path = mask_path(image_path)
    if not path.exists():
        return None
    m = read_image(path, "L")
    if tuple(m.shape[-2:]) != tuple(size):
        raise ValueError(f"{path}: mask is {m.shape[-1]}x{m.shape[-2]} but its image {image_path.name} is "
                         f"{size[1]}x{size[0]}; masks must have their image's size")
    return (m > 0.5).float()


def read_images_and_masks(source) -> tuple[torch.Tensor, torch.Tensor]:
    """All images at the first image's size (others are resized, with a note in the log); masks default to ones."""
    paths = list_images(source)
    images, masks = [], []
    size = None
    for p in paths:
        img = read_image(p)
        m = read_mask(p, tuple(img.shape[-2:]))
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
    """[3, H, W] or [N, 3, H, W] in [0, 1] -> PNG (a batch is laid out in one row)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if images.ndim == 4:
        images = torch.cat(list(images), dim=-1)
    arr = (images.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path
