"""Conditioning-image preprocessing of InstantBooth (paper, sec. 3.2): crop each image to its subject's mask box,
mask out the background, resize to the backbone's input size and apply CLIP normalisation. Training adds heavy
augmentation that moves image and mask together. Images are [N, 3, H, W] floats in [0, 1], masks [N, 1, H, W]."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from kornia.geometry.transform import crop_and_resize

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def with_mirrors(images: torch.Tensor, masks: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images followed by their mirror images (flipped left to right), and the masks alike."""
    return (torch.cat([images, images.flip(-1)]),
            None if masks is None else torch.cat([masks, masks.flip(-1)]))


def _check(images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if masks is None:
        return torch.ones_like(images[:, :1])
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"{masks.shape[0]} masks of size {tuple(masks.shape[-2:])} do not match "
                         f"{images.shape[0]} images of size {tuple(images.shape[-2:])}")
    return masks.to(images.dtype)


def mask_boxes(masks: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Square box around each mask's subject, grown by ``margin`` of its side: [N, 4, 2] corner points
    (top-left, top-right, bottom-right, bottom-left, x/y) as kornia's crop_and_resize wants them.
    An empty mask gives the whole image."""
    n, _, h, w = masks.shape
    boxes = []
    for m in masks[:, 0] > 0.5:
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(ys) == 0:
            y0, y1, x0, x1 = 0.0, h - 1.0, 0.0, w - 1.0
        else:
            y0, y1, x0, x1 = ys.min().item(), ys.max().item(), xs.min().item(), xs.max().item()
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        half = max(y1 - y0, x1 - x0) / 2 * (1 + 2 * margin) + 0.5
        # stay inside the image where possible, so the crop is filled with pixels, not padding
        half = min(half, max(h, w) / 2)
        cy = min(max(cy, half - 0.5), h - half - 0.5) if 2 * half <= h else (h - 1) / 2
        cx = min(max(cx, half - 0.5), w - half - 0.5) if 2 * half <= w else (w - 1) / 2
        t, b, l, r = cy - half + 0.5, cy + half - 0.5, cx - half + 0.5, cx + half - 0.5
        boxes.append([[l, t], [r, t], [r, b], [l, b]])
    return torch.tensor(boxes, dtype=torch.float32, device=masks.device)


def crop_to_mask(images: torch.Tensor, masks: torch.Tensor | None, size: int, margin: float = 0.1,
                 background: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop to each subject, fill the background with ``background``, resize to size×size.
    Returns the masked crops in [0, 1] and their masks."""
    masks = _check(images, masks)
    boxes = mask_boxes(masks, margin).to(images.dtype)
    # mask at full resolution first, so resizing never blends background pixels into the subject's edge;
    # shifting by the background value makes the crop's zero padding come out as background too
    masked = (images - background) * masks
    crops = crop_and_resize(masked, boxes, (size, size), mode="bilinear") + background
    crop_masks = (crop_and_resize(masks, boxes, (size, size), mode="bilinear") > 0.5).to(images.dtype)
    return crops, crop_masks


def clip_normalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean) / std


def prepare_concept_images(images: torch.Tensor, masks: torch.Tensor | None, size: int, margin: float = 0.1,
                           background: float = 0.0, normalize: bool = True, augment=None) -> torch.Tensor:
    """The inference path: crop, mask, resize, normalise (no augmentation, as in the paper).

    ``augment`` (training only): a callable (images, masks) -> (images, masks), e.g. :class:`TrainAugment`, applied
    to the masked crops, as the paper orders it (sec. 3.2: crop, mask, then x_s := A(x_s)); whatever the geometric
    part moves off the subject (padding, the jittered background) is set to ``background`` again afterwards."""
    crops, crop_masks = crop_to_mask(images, masks, size, margin, background)
    if augment is not None:
        crops, crop_masks = augment(crops, crop_masks)
        crops = torch.where(crop_masks > 0.5, crops, torch.full_like(crops, background))
    return clip_normalize(crops) if normalize else crops


class TrainAugment:
    """Heavy augmentation for the conditioning images in training: flip, scale/crop, rotation and colour jitter,
    applied to image and mask with the same parameters so the mask stays on the subject."""

    def __init__(self, degrees: float = 15.0, scale: tuple[float, float] = (0.75, 1.15), jitter: float = 0.2,
                 p_flip: float = 0.5, hue: float | None = None):
        import kornia.augmentation as K  # kornia's augmentation module is slow to import; only training needs it

        self.geometric = K.AugmentationSequential(
            K.RandomHorizontalFlip(p=p_flip),
            K.RandomAffine(degrees=degrees, translate=(0.05, 0.05), scale=scale, p=1.0),
            data_keys=["input", "mask"],
        )
        # hue: jitter / 4 unless given (0 keeps every hue: on the toy world the colours are part of the identity)
        self.color = K.ColorJitter(jitter, jitter, jitter, jitter / 4 if hue is None else hue, p=0.8)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = self.geometric(images, masks)
        return self.color(images).clamp(0, 1), (masks > 0.5).to(images.dtype)


def _resize_square(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[C, H, W] -> [C, size, size]: shorter side to ``size`` then a centre crop (what DreamBooth's loader does)."""
    _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    kwargs = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
    x = F.interpolate(x[None].float(), size=(nh, nw), mode=mode, **kwargs)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top: top + size, left: left + size]


def prepare_images(images, size: int, masks=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A list (or batch) of [3, H, W] images in [0, 1] (and [1, H, W] masks) -> [N, 3, size, size] (+ [N, 1, ...]).
    Images of other sizes are resized and centre-cropped, with a note in the log."""
    imgs = list(images) if not isinstance(images, torch.Tensor) or images.ndim == 4 else [images]
    if not imgs:
        raise ValueError("no training images: give at least one image of the subject (quick-tune: 4-6 is typical; "
                         "E4T: one)")
    for i, im in enumerate(imgs):
        if not isinstance(im, torch.Tensor) or im.ndim != 3 or im.shape[0] != 3:
            raise ValueError(f"training image {i} must be a [3, H, W] tensor in [0, 1], got "
                             f"{tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__}")
    sizes = sorted({tuple(im.shape[1:]) for im in imgs})
    if sizes != [(size, size)]:
        log.info("resizing %d training image(s) of size(s) %s to %dx%d (shorter side, centre crop)", len(imgs),
                 ", ".join(f"{h}x{w}" for h, w in sizes), size, size)
    out = torch.stack([_resize_square(im, size, "bilinear") for im in imgs]).clamp(0, 1)
    if masks is None:
        return out, None
    ms = list(masks) if not isinstance(masks, torch.Tensor) or masks.ndim == 4 else [masks]
    if len(ms) != len(imgs):
        raise ValueError(f"got {len(ms)} masks for {len(imgs)} images; give one mask per image or none")
    ms = [m if m.ndim == 3 else m[None] for m in ms]
    for i, (m, im) in enumerate(zip(ms, imgs)):
        if tuple(m.shape[1:]) != tuple(im.shape[1:]):
            raise ValueError(f"mask {i} is {tuple(m.shape[1:])} but its image is {tuple(im.shape[1:])}")
    return out, torch.stack([_resize_square(m[:1].float(), size, "nearest") for m in ms]).clamp(0, 1)
