import pytest
import torch

from boothkit.backend.preprocess import (CLIP_MEAN, CLIP_STD, TrainAugment, clip_normalize, crop_to_mask,
                                         prepare_concept_images)


def scene():
    img = torch.zeros(1, 3, 64, 64)
    img[:, 0] = 1.0  # red background
    img[:, :, 20:30, 40:50] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]  # blue subject
    mask = torch.zeros(1, 1, 64, 64)
    mask[:, :, 20:30, 40:50] = 1
    return img, mask


def test_crop_to_mask_keeps_subject_and_masks_background():
    img, mask = scene()
    crops, m = crop_to_mask(img, mask, size=32, margin=0.1, background=0.5)
    assert crops.shape == (1, 3, 32, 32) and m.shape == (1, 1, 32, 32)
    # the subject fills most of the crop (10 px box + margin -> ~12 px square scaled to 32)
    assert 0.5 < m.mean() < 0.9
    assert torch.allclose(crops[0, :, 16, 16], torch.tensor([0.0, 0.0, 1.0]), atol=1e-5), "centre is the subject"
    # no red background survives anywhere: red only ever comes from the gray fill (0.5) blending at edges
    assert crops[0, 0].max() <= 0.5 + 1e-5
    corner = crops[0, :, 0, 0]
    assert torch.allclose(corner, torch.full_like(corner, 0.5), atol=0.02), "the crop margin is background"


def test_missing_mask_is_whole_image_and_bad_masks_are_named():
    img, _ = scene()
    crops, m = crop_to_mask(img, None, size=16)
    assert m.min() == 1 and torch.allclose(crops.mean(), img.mean(), atol=0.05)
    with pytest.raises(ValueError, match="masks of size"):
        crop_to_mask(img, torch.ones(1, 1, 32, 32), size=16)
    with pytest.raises(ValueError, match=r"images must be \[N, 3, H, W\]"):
        crop_to_mask(img[0], None, size=16)


# OpenAI CLIP's published preprocessing (CLIPImageProcessor's image_mean / image_std), written out here rather than
# read from the package, so a changed constant fails
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_clip_normalize_values():
    assert (CLIP_MEAN, CLIP_STD) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    x = torch.tensor(OPENAI_CLIP_MEAN)[None, :, None, None].expand(1, 3, 2, 2)
    assert torch.allclose(clip_normalize(x), torch.zeros(1, 3, 2, 2), atol=1e-6)
    y = clip_normalize(torch.ones(1, 3, 1, 1))
    assert torch.allclose(y.flatten(), (1 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD))
    assert prepare_concept_images(*scene(), size=8).shape == (1, 3, 8, 8)


def test_augmentation_keeps_mask_on_subject():
    torch.manual_seed(3)
    img, mask = scene()
    img = img.repeat(8, 1, 1, 1)
    img[:, 1] = 0
    mask = mask.repeat(8, 1, 1, 1)
    aug_img, aug_mask = TrainAugment(jitter=0.0)(img, mask)
    assert aug_img.shape == img.shape and aug_mask.shape == mask.shape
    assert not torch.equal(aug_mask, mask), "geometry changes"
    # where the moved mask is on, the moved image is the blue subject (blue > red)
    on = aug_mask[:, 0] > 0
    inner = on & (torch.nn.functional.max_pool2d((~on).float()[:, None], 3, 1, 1)[:, 0] == 0)
    assert (aug_img[:, 2][inner] > aug_img[:, 0][inner]).float().mean() > 0.95
