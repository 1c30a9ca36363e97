"""The toy world's frozen scorers: identity network, toy CLIP, their files, training and metrics."""
from __future__ import annotations

import json
import logging
import math
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from boothkit.toyworld import scorers as sc
from boothkit.toyworld import store
from boothkit.toyworld import train_scorers as tts

TINY_ARGS = ["--tiny", "--renders-per-identity", "2", "--identity-steps", "2", "--clip-steps", "2", "--identity-batch",
             "8", "--clip-identities", "4", "--validate-identities", "3", "--log-every", "1", "--checkpoint-every", "1"]


class WordTokenizer:
    """Enough of a CLIPTokenizer for the scorers: whitespace words, bos/eos, eos doubles as padding."""

    bos_token_id, eos_token_id, pad_token_id, model_max_length = 0, 1, 1, 77

    def __init__(self, words):
        self.words = {w: i + 2 for i, w in enumerate(words)}

    def __len__(self):
        return len(self.words) + 2

    def __call__(self, texts, padding=True, truncation=True, max_length=77, return_tensors="pt"):
        rows = [[0] + [self.words[w] for w in t.split()] + [1] for t in texts]
        n = max(map(len, rows))
        return {"input_ids": torch.tensor([r + [1] * (n - len(r)) for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])}


@pytest.fixture
def restore_threads():
    """The trainer sets torch's thread count (it runs beside another training); put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_scorers():
    from transformers import CLIPModel

    torch.manual_seed(0)
    tok = WordTokenizer(["a", "red", "blue", "dog", "cat"])
    clip = CLIPModel(sc.clip_config(tok, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1,
                                    projection_dim=16)).eval()
    net = sc.IdentityNet(channels=(8, 16)).eval()
    return sc.Scorers(clip=clip, identity_net=net, tokenizer=tok, device=torch.device("cpu"))


def test_identity_net_shapes_and_unit_norm():
    net = sc.IdentityNet(channels=(8, 16), embed_dim=64, resolution=32)
    emb = net(torch.rand(5, 3, 32, 32))
    assert emb.shape == (5, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
    # other resolutions are resized to the network's own
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 64)


def test_identity_net_file_round_trip_and_metadata(tmp_path):
    net = sc.IdentityNet(channels=(8, 16)).eval()
    path = sc.save_identity_net(net, tmp_path / "id.safetensors", steps="7", seed="3")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == sc.IDENTITY_FORMAT and meta["version"] == sc.VERSION and meta["steps"] == "7"
    assert json.loads(meta["architecture"]) == {"channels": [8, 16], "embed_dim": 64, "resolution": 32}
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(sc.load_identity_net(path)(x), net(x))


def test_identity_net_wrong_format_names_file_and_field(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(bad), metadata={"format": "pt", "version": "1"})
    with pytest.raises(sc.ScorerFileError, match=r"bad\.safetensors.*'format' is 'pt'"):
        sc.load_identity_net(bad)


def test_clip_folder_loads_with_transformers(tmp_path, tiny_scorers):
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    files = sc.save_clip(tiny_scorers.clip, tmp_path / "clip", steps="2")
    assert sorted(p.name for p in files) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    with safe_open(str(tmp_path / "clip" / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == sc.CLIP_FORMAT and meta["version"] == sc.VERSION
    assert json.loads(meta["image_mean"]) == list(OPENAI_CLIP_MEAN)
    pre = json.loads((tmp_path / "clip" / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == list(OPENAI_CLIP_MEAN) and pre["image_std"] == list(OPENAI_CLIP_STD)
    assert pre["crop_size"] == {"height": 32, "width": 32}

    x = torch.randn(2, 3, 32, 32)
    vision = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip").eval()
    full = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    ours = sc._load_clip_parts(tmp_path / "clip", True, "cpu")
    out = vision(pixel_values=x)
    assert out.last_hidden_state.shape == (2, 65, 32)  # 8×8 patches + class token
    ref = tiny_scorers.clip.get_image_features(pixel_values=x).pooler_output
    torch.testing.assert_close(out.image_embeds, ref)
    torch.testing.assert_close(full.get_image_features(pixel_values=x).pooler_output, ref)
    torch.testing.assert_close(ours(pixel_values=x).last_hidden_state, out.last_hidden_state)


def test_scorer_values_and_input_checks(tiny_scorers):
    s = tiny_scorers
    g = torch.rand(3, 3, 32, 32)
    same = s.identity_similarity(g[:1], g[:1])
    torch.testing.assert_close(same, torch.ones(1))
    assert s.identity_similarity(g, g[1:]).shape == (3,)
    torch.testing.assert_close(s.clip_i(g[:1], g[:1]), torch.ones(1))
    # CLIP-I is the mean pairwise cosine to the references
    e = s.image_embeds(g)
    torch.testing.assert_close(s.clip_i(g[:1], g[1:]), (e[:1] @ e[1:].T).mean(1))
    t = s.clip_t(g, ["a red dog", "a blue cat", "a dog"])
    assert t.shape == (3,) and bool((t.abs() <= 1 + 1e-5).all())
    torch.testing.assert_close(s.clip_t(g[:1], ["a red dog"]), t[:1])
    torch.testing.assert_close(s.clip_t(g, ["a red dog"])[0], t[0])
    # inputs are checked
    with pytest.raises(ValueError, match=r"expected 1 or 3 texts"):
        s.clip_t(g, ["a", "a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        s.clip_i(g * 255, g)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        s.identity_similarity(g[0], g)
    with pytest.raises(ValueError, match="single string"):
        s.clip_t(g, "a red dog")


def test_clip_pixels_use_standard_clip_normalisation(tiny_scorers):
    x = torch.full((1, 3, 32, 32), 0.5)
    px = tiny_scorers._clip_pixels(x)
    expected = (0.5 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(px[0, :, 0, 0], expected)


def test_gaussian_blur_per_image_sigma():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16)
    out = sc.gaussian_blur(x, torch.tensor([1e-4, 1.0, 2.0]))
    torch.testing.assert_close(out[0], x[0])  # σ→0 leaves the image as is
    # more blur, less variation; a flat image stays flat
    assert float(out[1].std()) < float(x[1].std()) and float(out[2].std()) < float(out[1].std())
    flat = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(sc.gaussian_blur(flat, 1.5), flat)
    torch.testing.assert_close(sc.gaussian_blur(x[1:2], 1.0), out[1:2])


def test_roc_auc_exact_values():
    assert sc.roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([0.0])) == 1.0
    assert sc.roc_auc(torch.tensor([0.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert sc.roc_auc(torch.tensor([0.0, 2.0]), torch.tensor([1.0])) == 0.5
    assert sc.roc_auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5  # ties count one half


def test_multi_positive_clip_loss_treats_duplicate_captions_as_positives():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    img = torch.stack([e1, e1, e2])
    txt = torch.stack([e1, e1, e2])
    scale = torch.tensor(math.log(100.0))
    loss = tts.multi_positive_clip_loss(img, txt, ["a dog", "a dog", "a cat"], scale)
    # rows 0 and 1 spread their target over two equal logits: log 2 each; row 2 is certain
    assert abs(float(loss) - 2 / 3 * math.log(2)) < 1e-3
    # which "a dog" image is paired with which "a dog" text does not matter; with distinct captions it does
    u, v, w = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0], [0.2, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    txt = torch.stack([u, v, w])
    caps = ["a dog", "a dog", "a cat"]
    swapped, paired = torch.stack([v, u, w]), torch.stack([u, v, w])
    assert abs(float(tts.multi_positive_clip_loss(swapped, txt, caps, scale))
               - float(tts.multi_positive_clip_loss(paired, txt, caps, scale))) < 1e-6
    caps = ["a dog", "a puppy", "a cat"]
    assert float(tts.multi_positive_clip_loss(swapped, txt, caps, scale)) > \
        float(tts.multi_positive_clip_loss(paired, txt, caps, scale)) + 1


def test_supcon_prefers_identity_clusters():
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    mixed = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]])
    assert float(tts.supcon_loss(clustered, labels, 0.1)) < 0.01
    assert float(tts.supcon_loss(mixed, labels, 0.1)) > 5


def test_arcface_margin_penalises_the_true_class():
    head = tts.ArcFace(4, 3, scale=10.0, margin=0.3)
    emb = torch.nn.functional.normalize(head.weight.detach().clone(), dim=-1)
    labels = torch.arange(3)
    no_margin = tts.ArcFace(4, 3, scale=10.0, margin=0.0)
    no_margin.load_state_dict(head.state_dict())
    with torch.no_grad():
        assert float(head(emb, labels)) > float(no_margin(emb, labels))


def test_checkpoint_round_trip_and_settings_check(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "c.safetensors"
    tts.save_checkpoint(path, {"lin": lin}, opt, 5, {"seed": 0}, done=False)
    lin2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(lin2.parameters(), lr=1e-2)
    assert tts.load_checkpoint(path, {"lin": lin2}, opt2, {"seed": 0}) == (5, False)
    torch.testing.assert_close(lin2.weight, lin.weight)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    torch.testing.assert_close(s2["exp_avg"], s1["exp_avg"])
    torch.testing.assert_close(s2["step"], s1["step"])
    with pytest.raises(ValueError, match="seed"):
        tts.load_checkpoint(path, {"lin": lin2}, opt2, {"seed": 1})


def test_mask_and_crop_masks_background_and_crops_to_the_subject():
    img = torch.rand(3, 32, 32) * 0.5 + 0.25
    mask = torch.zeros(1, 32, 32)
    mask[:, 10:18, 12:20] = 1
    masked = tts.mask_and_crop(img, mask, fill=1.0, crop=False)
    torch.testing.assert_close(masked[:, 10:18, 12:20], img[:, 10:18, 12:20])
    assert bool((masked[:, :10] == 1).all()) and bool((masked[:, :, :12] == 1).all())
    cropped = tts.mask_and_crop(img, mask, fill=1.0, crop=True)
    assert cropped.shape == (3, 32, 32) and float(cropped.min()) >= 0 and float(cropped.max()) <= 1
    # the 8×8 subject fills most of the frame after cropping to its (padded 10×10) box
    subject = (cropped < 0.99).any(0).float().mean()
    assert float(subject) > 0.5 > float((masked < 0.99).any(0).float().mean())


def test_two_step_training_writes_loadable_files(tmp_path, restore_threads):
    out, run = tmp_path / "weights", tmp_path / "run"
    argv = ["--out-dir", str(out), "--run-dir", str(run), *TINY_ARGS]
    validation = tts.main(argv)
    assert set(validation) >= {"identity", "clip_i", "clip_t"}
    assert 0 <= validation["clip_t"]["context_accuracy"] <= 1
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert set(manifest) >= {"identity.safetensors", "clip/config.json", "clip/model.safetensors",
                             "clip/preprocessor_config.json", "clip/tokenizer_config.json"}
    assert manifest["identity.safetensors"]["reproduce"] == (
        "python -m boothkit.toyworld.train_scorers " + " ".join(argv))
    with safe_open(str(out / "identity.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == sc.IDENTITY_FORMAT and meta["steps"] == "2" and "validation" in meta
    with safe_open(str(out / "clip" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == sc.CLIP_FORMAT

    scorers = sc.load_scorers(weights_dir=out)
    vision, folder = sc.load_clip_vision(weights_dir=out)
    assert folder == out / "clip" and vision.config.image_size == 32
    x = torch.rand(2, 3, 32, 32)
    assert scorers.identity_similarity(x, x).shape == (2,)

    # resuming a finished run trains nothing and re-exports the same weights and metadata (not byte-identical:
    # safetensors writes its metadata map in no fixed order)
    def exported():
        return {rel: (load_file(str(out / rel)), safe_open(str(out / rel), framework="pt").metadata())
                for rel in ("identity.safetensors", "clip/model.safetensors")}

    before = exported()
    tts.main(argv + ["--resume"])
    for rel, (tensors, meta) in exported().items():
        assert meta == before[rel][1], rel
        assert tensors.keys() == before[rel][0].keys()
        assert all(torch.equal(v, before[rel][0][k]) for k, v in tensors.items()), rel

    # a changed file is refused before it is loaded
    with open(out / "identity.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(store.WeightsError, match="sha256"):
        sc.load_scorers(weights_dir=out)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch, restore_threads, caplog):
    # float results depend on the thread count (Adam turns that noise into visible differences): fix it for all runs
    torch.set_num_threads(1)

    def run(name, *extra):
        out = tmp_path / name
        tts.main(["--out-dir", str(out / "w"), "--run-dir", str(out / "run"), *TINY_ARGS, "--clip-steps", "3",
                  *extra])
        return load_file(str(out / "w" / "clip" / "model.safetensors"))

    straight = run("straight")
    real_lr_at = tts.lr_at

    def crash_at_clip_step_2(step, total, base):
        if step == 2 and total == 3:
            raise KeyboardInterrupt
        return real_lr_at(step, total, base)

    monkeypatch.setattr(tts, "lr_at", crash_at_clip_step_2)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    assert not (tmp_path / "resumed" / "w" / "clip").exists()  # nothing exported from a failed run
    monkeypatch.setattr(tts, "lr_at", real_lr_at)
    with caplog.at_level(logging.INFO, logger="boothkit.toyworld.train_scorers"):
        resumed = run("resumed", "--resume")
    # a run that ignored its checkpoints would also match (deterministic per step): the log must say where it resumed
    assert "identity: resumed at step" in caplog.text and "(done)" in caplog.text
    assert "clip: resumed at step 2/3" in caplog.text, caplog.text[-2000:]
    assert all(torch.equal(v, straight[k]) for k, v in resumed.items())


def test_shipped_scorer_files_match_the_manifest():
    """The shipped scorers are part of the package: a missing or changed file fails here and in the tests below
    (they load through the sha256 check), never skips."""
    assert store.verified(sc.IDENTITY_FILE).is_file()
    assert store.verified_dir(sc.CLIP_DIR).is_dir()


@pytest.mark.slow
def test_shipped_scorers_tell_identities_apart():
    from boothkit.toyworld import domain

    scorers = sc.load_scorers()
    rng = random.Random(0)
    held = domain.identities("heldout")
    a, b = held[0], next(i for i in held[1:] if i.class_name == held[0].class_name)

    def renders(ident, n):
        return torch.stack([domain.render(ident, domain.random_context(rng), rng.randrange(2**31)).image
                            for _ in range(n)]).float()

    refs, same, other = renders(a, 4), renders(a, 4), renders(b, 4)
    assert float(scorers.identity_similarity(same, refs).mean()) > \
        float(scorers.identity_similarity(other, refs).mean()) + 0.3
    assert float(scorers.clip_i(same, refs).mean()) > float(scorers.clip_i(other, refs).mean())
    vision, _ = sc.load_clip_vision()
    out = vision(pixel_values=scorers._clip_pixels(refs))
    assert out.last_hidden_state.shape[:2] == (4, 65)


def test_context_margin_scores_the_context_words_not_the_subject():
    from boothkit.toyworld import domain

    scorers = sc.load_scorers()
    rng = random.Random(0)
    idents = domain.identities("heldout")[:6]
    ctxs = [domain.Context("snow", "night", "tree"), domain.Context("grass", "day", None)]
    images = torch.stack([domain.render(i, ctxs[k % 2], rng.randrange(2**31)).image
                          for k, i in enumerate(idents)]).float()

    def score(contexts):
        texts = [domain.context_prompt(i.class_name, c) for i, c in zip(idents, contexts)]
        alts = [[domain.context_prompt(i.class_name, a) for a in domain.one_field_changes(c)]
                for i, c in zip(idents, contexts)]
        return scorers.context_margin(images, texts, alts)

    true = score([ctxs[k % 2] for k in range(6)])
    wrong = score([ctxs[(k + 1) % 2] for k in range(6)])
    assert true.shape == (6,) and bool((true > 0.05).all()), true
    assert float(true.mean()) > float(wrong.mean()) + 0.1
    # the margin is CLIP-T minus the mean cosine with the alternatives
    texts = [domain.context_prompt(idents[0].class_name, ctxs[0])]
    alts = [domain.context_prompt(idents[0].class_name, a) for a in domain.one_field_changes(ctxs[0])]
    expect = scorers.clip_t(images[:1], texts) - scorers.clip_t(images[:1].expand(len(alts), -1, -1, -1), alts).mean()
    assert float(scorers.context_margin(images[:1], texts, [alts])[0]) == pytest.approx(float(expect), abs=1e-5)
    with pytest.raises(ValueError, match="one per image"):
        scorers.context_margin(images, texts, [alts])


def test_shipped_clip_uses_the_shipped_tokenizer_ids():
    from transformers import CLIPTokenizer

    from boothkit.toyworld.tokenizer import load_tokenizer

    folder = store.verified_dir(sc.CLIP_DIR)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        recorded = f.metadata()["tokenizer_vocab_sha256"]
    # the copy beside the CLIP weights, the digest recorded at training time and the toy world's tokenizer agree
    assert sc.tokenizer_digest(CLIPTokenizer.from_pretrained(str(folder))) == recorded
    assert sc.tokenizer_digest(load_tokenizer()) == recorded, "toy tokenizer changed: retrain the toy scorers"
