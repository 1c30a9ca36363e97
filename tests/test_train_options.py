"""InstantBooth training options, each checked against what it must change (or must not): caching, the class-noun-
free prompts, conditioning on other images of the identity, the subject weight of the loss. Method-level calls on
tiny models: no training run, a fraction of a second each."""
import json

import pytest
import torch
from test_train_instantbooth import write_dataset
from tiny_models import tiny_clip_vision, tiny_sd_folder

from boothkit.training.data import FolderDataset, LatentTargets
from boothkit.training.instantbooth import InstantBoothSettings, InstantBoothTraining

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory, one_thread):
    from boothkit.commands.models import load_model, load_vision

    root = tmp_path_factory.mktemp("options")
    sd = tiny_sd_folder(root / "sd", with_vae=True)
    tiny_clip_vision().save_pretrained(root / "vision")
    model = load_model(sd)
    return model, load_vision(root / "vision"), FolderDataset(write_dataset(root / "data"), model.resolution), root


_live: list[InstantBoothTraining] = []


def method(parts, dataset=None, **settings) -> InstantBoothTraining:
    """A training method on the shared tiny model; the previous one's adapter hooks come off the UNet first (each
    method attaches its own)."""
    model, vision, ds, _ = parts
    while _live:
        _live.pop().hooks.remove()
    torch.manual_seed(0)  # the heads' initial weights
    m = InstantBoothTraining(model, vision, dataset or ds, InstantBoothSettings(category="cat", **settings))
    _live.append(m)
    return m


def loss(m, indices, seed=3) -> torch.Tensor:
    torch.manual_seed(seed)  # kornia's augmentation draws from the global generator, as in the trainer
    with torch.no_grad():
        return m.loss(indices, torch.Generator().manual_seed(seed))


def test_caches_change_nothing_but_are_used(parts):
    """Cached VAE latents and text encodings give the loss of fresh ones (same draws); the caches fill when on and
    stay empty when off. Indices out of order catch a cache that returns the wrong rows."""
    batches = ([3, 1], [0, 5], [3, 1])
    cached = method(parts)
    with_cache = [loss(cached, idx) for idx in batches]
    fresh = method(parts, cache_latents=False, cache_text=False)
    for idx, value in zip(batches, with_cache):
        assert torch.allclose(value, loss(fresh, idx), rtol=1e-5, atol=1e-6), idx
    assert cached.targets._cached is not None and len(cached.targets._cached) == len(parts[2])
    assert fresh.targets._cached is None
    assert len(cached._text_cache) > 0 and fresh._text_cache == {}
    lat = LatentTargets(parts[0], parts[2], "cpu", cache=True)([4, 2])
    assert torch.allclose(lat, LatentTargets(parts[0], parts[2], "cpu", cache=False)([4, 2]), atol=1e-5)


@pytest.mark.parametrize("prob, without", [(0.0, 0), (1.0, 2)])
def test_class_noun_free_prob_drops_the_class_noun(parts, monkeypatch, prob, without):
    m = method(parts, class_noun_free_prob=prob)
    seen = []
    real = m._encode_text
    monkeypatch.setattr(m, "_encode_text", lambda prompts: seen.extend(prompts) or real(prompts))
    loss(m, [0, 1])
    # captions "a photo of a cat on grass" / "a cat on the beach"; the identifier goes before the noun
    assert sorted(seen) == sorted(["a photo of a sks on grass", "a sks on the beach"][:without] +
                                  ["a photo of a sks cat on grass", "a sks cat on the beach"][without:])


def test_class_noun_free_prob_draws_per_prompt(parts, monkeypatch):
    m = method(parts, class_noun_free_prob=0.5)
    seen = []
    real = m._encode_text
    monkeypatch.setattr(m, "_encode_text", lambda prompts: seen.extend(prompts) or real(prompts))
    for seed in range(6):
        loss(m, [0, 1], seed)
    free = sum(" cat " not in p for p in seen)
    assert 0 < free < len(seen), seen


def test_same_image_false_conditions_on_other_images_of_the_identity(parts, tmp_path, monkeypatch):
    """Four images, two identities (metadata.jsonl): with same_image the concept image is the target itself, without
    it the identity's other image."""
    folder = write_dataset(tmp_path / "ids", n=4)
    rows = [{"file": f"{i:03d}.png", "caption": "a photo of a cat", "identity": "ab"[i // 2]} for i in range(4)]
    (folder / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    ds = FolderDataset(folder, parts[0].resolution)
    for same, expect in ((True, [0, 2]), (False, [1, 3])):
        m = method(parts, dataset=ds, same_image=same, augment=False)
        seen = []
        real = m.concept_features
        monkeypatch.setattr(m, "concept_features", lambda images, *a: seen.append(images) or real(images, *a))
        loss(m, [0, 2])
        assert torch.equal(seen[0], ds.images[expect]), (same, expect)


def test_subject_weight_weights_the_masked_pixels(parts):
    """loss(w) = (L·N + w·L_m·M) / (N + w·M): L the plain mean, L_m the masked loss, N the pixels, M the masked
    pixels (per channel), all on the same draws; the masks are a box, so the three losses differ."""
    idx = [0, 3]
    m = method(parts)
    plain = float(loss(m, idx))
    m.s.masked_loss = True
    masked = float(loss(m, idx))
    m.s.masked_loss = False
    m.s.subject_weight = 3.0
    weighted = float(loss(m, idx))
    lat = m.targets(idx)
    mask = torch.nn.functional.interpolate(parts[2].masks[idx], size=lat.shape[-2:], mode="nearest")
    n, k = float(mask.numel()), float(mask.sum())
    assert 0 < k < n and abs(plain - masked) > 1e-3
    assert weighted == pytest.approx((plain * n + 3.0 * masked * k) / (n + 3.0 * k), rel=1e-5)


def test_background_residual_weight_penalises_the_adapter_term_off_the_subject(parts):
    """The added term is the weight times the adapters' energy on tokens with no subject pixel over ‖y‖²: zero with
    closed gates (γ = 0) and with a mask that covers every token, exactly weight × penalty otherwise, and its gradient
    reaches the adapters."""
    idx = [0, 3]
    m = method(parts)
    plain = float(loss(m, idx))
    m.s.background_residual_weight = 2.0
    assert float(loss(m, idx)) == plain  # fresh adapters: tanh(0) = 0, no term anywhere
    for a in m.ib.adapters:
        a.gate.data.fill_(0.5)
    m.s.background_residual_weight = 0.0
    opened = float(loss(m, idx))
    assert m.hooks.residuals is None  # off: nothing is kept
    m.s.background_residual_weight = 2.0
    seen, penalty = [], m.background_residual
    m.background_residual = lambda *a: (seen.append((list(m.hooks.residuals), a)), penalty(*a))[1]
    total = float(loss(m, idx))
    terms, (masks, size) = seen[0]
    assert len(terms) == len(m.ib.adapters) and m.hooks.residuals is None
    m.hooks.residuals = list(terms)
    background = float(penalty(masks, size))
    assert background > 0 and total == pytest.approx(opened + 2.0 * background, rel=1e-5)
    m.hooks.residuals = list(terms)
    assert float(penalty(torch.ones_like(masks), size)) == 0.0  # the subject everywhere: nothing to penalise
    m.hooks.residuals = list(terms)
    assert float(penalty(torch.zeros_like(masks), size)) > background  # no subject: every token counts
    torch.manual_seed(3)
    m.loss(idx, torch.Generator().manual_seed(3)).backward()
    assert all(a.gate.grad is not None and a.gate.grad.abs() > 0 for a in m.ib.adapters)


def test_pixel_features_start_from_a_file_without_them_and_change_nothing_until_trained(parts, tmp_path):
    """A run with pixel features started from a file without them computes that file's loss at step 0 (the pixel map
    starts at zero), then learns the map with the heads; a file with pixel features cannot start a run without."""
    from boothkit.backend.instantbooth import save_instantbooth

    idx = [0, 3]
    plain = method(parts)
    for a in plain.ib.adapters:
        a.gate.data.fill_(0.5)
    start = save_instantbooth(tmp_path / "plain.safetensors", plain.ib)
    expected = float(loss(plain, idx))
    ours = method(parts, pixel_features=True, init_from=str(start))
    assert float(loss(ours, idx)) == pytest.approx(expected, rel=1e-6)
    assert any(p is ours.ib.pixel_encoder.fc.weight for g in ours.param_groups() if g["lr"] == ours.s.lr_heads
               for p in g["params"])
    torch.manual_seed(3)
    ours.loss(idx, torch.Generator().manual_seed(3)).backward()
    assert ours.ib.pixel_encoder.fc.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="do not fit this run's"):
        method(parts, init_from=str(save_instantbooth(tmp_path / "px.safetensors", ours.ib)))


def test_color_jitter_sets_the_conditioning_images_jitter(parts):
    """``color_jitter`` is the brightness, contrast and saturation range of the conditioning images' colour jitter
    (0.2 before the setting); ``hue_jitter`` stays the hue's."""
    for jitter in (0.2, 0.5):
        c = method(parts, color_jitter=jitter, hue_jitter=0.0).augment.color
        assert (c.brightness, c.contrast, c.saturation, c.hue) == (jitter, jitter, jitter, 0.0)
