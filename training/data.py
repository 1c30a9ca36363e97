"""Training data from a folder: images with captions (``NAME.txt`` beside each image, or a ``metadata.jsonl`` with
``file``/``caption`` and optionally ``identity``), optional masks (``NAME_mask.png``; missing = whole image).

Everything is checked up front and every problem names its file; ``skip_bad`` reports bad items and goes on."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backend.imageio import list_images, read_image_and_mask

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The dataset folder has a problem; the message lists each bad file and why."""


@dataclass
class Item:
    path: Path
    caption: str
    identity: str  # items of one identity may condition each other (N > 1 images per concept)


def _read_metadata(folder: Path) -> dict[str, dict]:
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        return {}
    out = {}
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[row["file"]] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{meta}:{n}: expected a JSON object with 'file' and 'caption', "
                            f"got {line[:80]!r}") from None
    return out


class FolderDataset:
    """All images of a folder, loaded into memory at one size (``resolution``): the targets of the denoiser."""

    def __init__(self, folder: str | Path, resolution: int, skip_bad: bool = False):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset folder {folder} does not exist")
        meta = _read_metadata(folder)
        problems, items, images, masks = [], [], [], []
        for path in list_images(folder):
            try:
                item, img, m = self._load(path, meta.get(path.name), resolution)
            except (ValueError, OSError) as e:
                problems.append(str(e))
                continue
            items.append(item)
            images.append(img)
            masks.append(m)
        if problems:
            report = "\n  ".join(problems)
            if not skip_bad:
                raise DataError(f"{len(problems)} bad item(s) in {folder} (pass --set data.skip_bad=true to skip "
                                f"them):\n  {report}")
            log.warning("skipping %d bad item(s) in %s:\n  %s", len(problems), folder, report)
        if not items:
            raise DataError(f"no usable images in {folder}")
        self.folder, self.items = folder, items
        self.images = torch.stack(images)  # [M, 3, R, R] in [0, 1]
        self.masks = torch.stack(masks)  # [M, 1, R, R]
        by_identity: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            by_identity.setdefault(it.identity, []).append(i)
        self.by_identity = by_identity
        log.info("dataset %s: %d images, %d identities", folder, len(items), len(by_identity))

    @staticmethod
    def _load(path: Path, row: dict | None, resolution: int):
        if row is not None:
            caption, identity = str(row.get("caption", "")), str(row.get("identity", path.stem))
        else:
            txt = path.with_suffix(".txt")
            if not txt.exists():
                raise ValueError(f"{path}: no caption ({txt.name} missing and no metadata.jsonl entry)")
            caption, identity = txt.read_text().strip(), path.stem
        if not caption.strip():
            raise ValueError(f"{path}: empty caption")
        img, m = read_image_and_mask(path)  # NAME_mask.png, else the image's alpha, else None
        h, w = img.shape[-2:]
        if (h, w) != (resolution, resolution):
            if h != w or h < resolution:
                raise ValueError(f"{path}: image is {w}x{h}; expected square images of at least "
                                 f"{resolution}x{resolution} (they are resized down to the training resolution)")
            img = torch.nn.functional.interpolate(img[None], size=(resolution, resolution), mode="bilinear",
                                                  antialias=True)[0]
        if m is not None:
            m = torch.nn.functional.interpolate(m[None], size=(resolution, resolution), mode="nearest")[0]
            m = (m > 0.5).float()
        else:
            m = torch.ones(1, resolution, resolution)
        return Item(path, caption.strip(), identity), img, m

    def __len__(self) -> int:
        return len(self.items)

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The epoch's permutation: a function of (seed, epoch) only, so a resumed run sees the same order."""
        key = (seed, epoch)
        if getattr(self, "_order_key", None) != key:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            self._order_key, self._order = key, torch.randperm(len(self), generator=g)
        return self._order

    def indices(self, seed: int, position: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
        """Indices of micro-batch number ``position`` for process ``rank`` of ``world``."""
        out = []
        per_step = batch_size * world
        start = position * per_step + rank * batch_size
        for k in range(start, start + batch_size):
            epoch, pos = divmod(k, len(self))
            out.append(int(self.order(seed, epoch)[pos]))
        return out

    def concept_indices(self, index: int, n: int, generator: torch.Generator, same_image: bool) -> list[int]:
        """Conditioning images for item ``index``: the item itself (the paper's N=1 training without paired data),
        or ``n`` images of its identity, other images first, when the dataset has them."""
        if same_image or n == 1 and len(self.by_identity[self.items[index].identity]) == 1:
            return [index] * n
        pool = [i for i in self.by_identity[self.items[index].identity] if i != index] or [index]
        pick = torch.randint(len(pool), (n,), generator=generator)
        return [pool[int(i)] for i in pick]


class LatentTargets:
    """x0 of dataset images as the denoiser sees them: pixels in [-1, 1] for a pixel-space model (the toy world), or
    VAE latents, computed once and kept when ``cache`` (no augmentation touches the targets)."""

    def __init__(self, model, dataset: FolderDataset, device, cache: bool = True):
        self.model, self.dataset, self.device, self.cache = model, dataset, torch.device(device), cache
        self._cached: torch.Tensor | None = None

    def __call__(self, indices: list[int]) -> torch.Tensor:
        if self.model.vae is None:
            return self.dataset.images[indices].to(self.device) * 2 - 1
        if self.cache:
            if self._cached is None:
                self._cached = torch.cat([self._encode(self.dataset.images[i:i + 16])
                                          for i in range(0, len(self.dataset), 16)])
            return self._cached[indices]
        return self._encode(self.dataset.images[indices])

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.model.vae
        x = images.to(self.device, next(vae.parameters()).dtype) * 2 - 1
        return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
