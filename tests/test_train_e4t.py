"""`boothkit train e4t`: resume reads its checkpoint (E4T's trainer is training/trainer.py, like InstantBooth's) and
the frozen base stays as it was, in memory."""
import logging

import pytest
import torch
from checkpoints import adam_steps, tamper, trained_weights
from tiny_models import training_world, write_config

from boothkit.backend.files import read_safetensors
from boothkit.commands.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("e4t")
    return write_config(root / "e4t.toml", *training_world(root),
                        method=dict(category="cat", lr=1e-3, hidden=16, modulation_rank=2),
                        train=dict(batch_size=2, steps=2, checkpoint_every=2, ema_decay=0.5))


def weights(path):
    return read_safetensors(path)[0]


def test_resume_gives_the_same_weights_and_reads_the_checkpoint(config, tmp_path, caplog):
    """2 steps + resume to 4 == 4 steps (EMA exported), the log names the checkpoint and step; then checkpoint 4
    changed in a known way (weights +0.5, EMA 0.25, Adam's step 100): resuming with nothing left to train exports
    that EMA exactly, one more step counts Adam's step 101 and keeps the weights within one step (lr 1e-3)."""
    common = ["e4t", "--config", str(config)]
    full, part = tmp_path / "full", tmp_path / "part"
    train_main(common + ["--output-dir", str(full), "--steps", "4"])
    train_main(common + ["--output-dir", str(part), "--steps", "2"])
    with caplog.at_level(logging.INFO, logger="boothkit.training.trainer"):
        train_main(common + ["--output-dir", str(part), "--steps", "4", "--resume"])
    assert f"resumed from {part / 'checkpoints' / 'checkpoint-0000002.safetensors'} at step 2" in caplog.text
    a, b = weights(full / "e4t.safetensors"), weights(part / "e4t.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    ckpt = part / "checkpoints" / "checkpoint-0000004.safetensors"
    assert adam_steps(ckpt) == {4.0}
    changed = tamper(ckpt, shift=0.5, adam_step=100, ema=0.25)
    train_main(common + ["--output-dir", str(part), "--steps", "4", "--resume"])
    assert all(torch.equal(v, torch.full_like(v, 0.25)) for v in weights(part / "e4t.safetensors").values())
    train_main(common + ["--output-dir", str(part), "--steps", "5", "--resume"])
    last = part / "checkpoints" / "checkpoint-0000005.safetensors"
    assert adam_steps(last) == {101.0}
    w5 = trained_weights(last)
    assert max(float((w5[k] - v).abs().max()) for k, v in changed.items()) < 4e-3
    exported = weights(part / "e4t.safetensors")  # EMA: 0.5 · 0.25 + 0.5 · the weights of step 5
    for k, v in w5.items():
        assert torch.allclose(exported[k], 0.125 + 0.5 * v, atol=1e-6), k


def test_frozen_base_is_untouched(config, tmp_path, monkeypatch):
    """The base model and backbone the run trained on, compared in memory after the run; nothing left trainable."""
    from boothkit.commands import train as train_cmd

    seen = {}
    real = train_cmd._load

    def spy(cfg):
        loaded = real(cfg)
        seen["parts"] = loaded[0].parts() + [loaded[1]]
        seen["before"] = [{k: v.clone() for k, v in part.state_dict().items()} for part in seen["parts"]]
        return loaded

    monkeypatch.setattr(train_cmd, "_load", spy)
    train_main(["e4t", "--config", str(config), "--output-dir", str(tmp_path / "r")])
    assert len(seen["parts"]) == 4, "unet, text encoder, vae, vision"
    for part, before in zip(seen["parts"], seen["before"]):
        after = part.state_dict()
        assert after.keys() == before.keys()
        changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
        assert not changed, changed[:5]
        assert not any(p.requires_grad for p in part.parameters())


def test_caches_change_nothing_but_are_used(config):
    """Cached VAE latents and CLIP class tokens equal fresh ones, row for row (indices out of order catch a cache that
    returns the wrong rows; the images' tokens differ by ~0.4), and the loss on the same draws is the same; the
    caches fill when on and stay empty when off."""
    import dataclasses

    from boothkit.commands.train import _load, parse_args, resolve
    from boothkit.training.e4t import E4TSettings, E4TTraining

    model, vision, dataset, _, _ = _load(resolve(parse_args(["e4t", "--config", str(config)])))
    settings = E4TSettings(category="cat", hidden=16, modulation_rank=2)
    batches = ([3, 1], [0, 5], [3, 1])
    seen = {}
    for cache in (True, False):
        torch.manual_seed(0)
        m = E4TTraining(model, vision, dataset, dataclasses.replace(settings, cache_latents=cache,
                                                                    cache_vision=cache))
        split = m.train_set
        with torch.no_grad():
            seen[cache] = [(m._tokens(split, idx), split["targets"](idx),
                            float(m.loss(idx, torch.Generator().manual_seed(5)))) for idx in batches]
        assert (split["targets"]._cached is not None) == cache and bool(split["tokens"]) == cache
        for h in m.attached:
            h.remove()
    for (tok, x0, loss), (tok2, x02, loss2) in zip(seen[True], seen[False]):
        assert torch.allclose(tok, tok2, atol=1e-5) and torch.allclose(x0, x02, atol=1e-5)
        assert loss == pytest.approx(loss2, rel=1e-5)
        assert (tok[0] - tok[1]).abs().max() > 0.05, "the two images' tokens differ"
