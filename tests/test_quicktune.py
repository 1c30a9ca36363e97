import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_clip_text, tiny_sd_folder, tiny_tokenizer, tiny_unet, tiny_vae

from boothkit.backend import quicktune as qt
from boothkit.backend import files
from boothkit.backend import tune
from boothkit.backend.embedding import load_embedding
from boothkit.backend.files import read_safetensors
from boothkit.backend.lora import load_lora
from boothkit.hosts.diffusers import quicktune as dt
from boothkit.toyworld.methods import quicktune_config
from boothkit.hosts.diffusers import common

WORDS = ("a", "photo", "of", "sks", "cat", "dog", "rare", "on", "the", "beach")

pytestmark = pytest.mark.usefixtures("one_thread")



def pixel_unet(cross_attention_dim=32, **extra):
    from diffusers import UNet2DConditionModel

    cfg = dict(tiny_unet(cross_attention_dim=cross_attention_dim).config)
    cfg.update(in_channels=3, out_channels=3, **extra)
    return UNet2DConditionModel.from_config(cfg).eval()


def make_model(tmp_path, latent=False, family="toy"):
    from diffusers import DDPMScheduler

    tok = tiny_tokenizer(tmp_path / "tok", WORDS)
    te = tiny_clip_text(vocab=len(tok.get_vocab()))
    unet = tiny_unet(sample_size=16) if latent else pixel_unet()
    return SimpleNamespace(unet=unet, text_encoder=te, tokenizer=tok, vae=tiny_vae() if latent else None,
                           scheduler=DDPMScheduler(num_train_timesteps=100), family=family)


def make_sdxl(tmp_path):
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok = tiny_tokenizer(tmp_path / "tok", WORDS)
    vocab = len(tok.get_vocab())
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=16)).eval()
    unet = pixel_unet(cross_attention_dim=80, addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=16 + 6 * 4)
    model = SimpleNamespace(unet=unet, text_encoder=tiny_clip_text(vocab=vocab), tokenizer=tok, text_encoder_2=te2,
                            tokenizer_2=tok, vae=None, scheduler=DDPMScheduler(num_train_timesteps=100), family="sdxl")
    # transformers installs its own (inert) output-capturing hooks at the first output_hidden_states call, as in any
    # SDXL pipeline; make that happen before the snapshot so the hook check sees only ours
    common.encode_prompt(model, "a photo of cat", resolution=16)
    return model


def parts(model):
    return [m for m in (model.unet, model.text_encoder, getattr(model, "text_encoder_2", None), model.vae) if m]


def snapshot(model):
    return [({k: v.clone() for k, v in m.state_dict().items()}, [p.requires_grad for p in m.parameters()],
             hook_counts(m)) for m in parts(model)]


def hook_counts(module):
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()]


def assert_untouched(model, snap):
    for m, (state, flags, hooks) in zip(parts(model), snap):
        for k, v in m.state_dict().items():
            assert torch.equal(v, state[k]), f"{type(m).__name__}.{k} changed"
        assert [p.requires_grad for p in m.parameters()] == flags, "requires_grad flags not restored"
        assert all(p.grad is None for p in m.parameters()), "a frozen weight received a gradient"
        assert hook_counts(m) == hooks, "a hook was left attached"


def images(n=3, size=16):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, size, size, generator=g) for _ in range(n)]


def tiny_config(s1=3, s2=3, **kw):
    return quicktune_config(stage1=qt.StageConfig(s1, 1e-2, 2), stage2=qt.StageConfig(s2, 1e-3, 2), **kw)


# ---------------------------------------------------------------------------------------------------- tune loop


class GradBomb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sum() * 0

    @staticmethod
    def backward(ctx, g):
        return torch.full((3,), float("inf"))


def test_tune_loop_optimises_cancels_and_guards_nan():
    p = torch.zeros(3, requires_grad=True)
    r = tune.tune_loop([p], lambda step: ((p - 3) ** 2).sum(), 200, 0.1)
    assert r.ok and r.steps == 200 and torch.allclose(p, torch.full((3,), 3.0), atol=1e-2)

    asked = []
    p = torch.zeros(3, requires_grad=True)
    r = tune.tune_loop([p], lambda step: ((p - 3) ** 2).sum(), 50, 0.1, should_cancel=lambda: len(asked.append(0) or
                                                                                                 asked) > 4)
    assert r.status == tune.CANCELLED and r.steps == 4 and len(r.losses) == 4

    for bad in ("loss", "grad"):
        p = torch.zeros(3, requires_grad=True)
        seen = []

        def loss_fn(step):
            if step == 5:
                return p.sum() * float("nan") if bad == "loss" else GradBomb.apply(p)
            return ((p - 3) ** 2).sum()

        r = tune.tune_loop([p], loss_fn, 50, 0.1, on_progress=lambda done, n, loss: seen.append(p.detach().clone()))
        assert r.status == tune.NAN and r.steps == 5, r
        assert torch.equal(p.detach(), seen[-1]), "the parameters keep the state after the last good step"
        assert torch.isfinite(p).all()


def test_tune_loop_param_groups_keep_their_own_rates():
    """A first Adam step moves every parameter by about its group's rate; plain tensors take ``lr``."""
    a, b, c = (torch.zeros(4, requires_grad=True) for _ in range(3))
    r = tune.tune_loop(iter([{"params": [a], "lr": 1e-1}, {"params": [b], "lr": 1e-4}, c]),
                     lambda step: ((a - 3) ** 2).sum() + ((b - 3) ** 2).sum() + ((c - 3) ** 2).sum(), 1, 1e-2)
    assert r.ok
    torch.testing.assert_close(a.detach(), torch.full((4,), 1e-1))
    torch.testing.assert_close(b.detach(), torch.full((4,), 1e-4))
    torch.testing.assert_close(c.detach(), torch.full((4,), 1e-2))


def test_tune_loop_rejects_bad_arguments():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="learning rate"):
        tune.tune_loop([p], lambda s: p.sum(), 3, float("nan"))
    with pytest.raises(ValueError, match="requires_grad"):
        tune.tune_loop([torch.zeros(3)], lambda s: p.sum(), 3, 0.1)
    r = tune.tune_loop([p], lambda s: (p ** 2).sum(), 2, 0.1, mixed_precision="bf16")
    assert r.ok and p.dtype == torch.float32


def test_masked_loss_ignores_the_background():
    sched = tune.NoiseSchedule(torch.linspace(0.99, 0.1, 50))
    x0 = torch.randn(2, 3, 8, 8)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    g.manual_seed(0)

    def predict(x, t, cond):  # exact inside the mask, garbage outside
        return torch.where(masks.bool(), noise, torch.full_like(x, 7.0))

    loss = tune.denoising_loss(predict, sched, x0, None, masks, g)
    assert torch.allclose(loss, torch.zeros(2), atol=1e-6)
    g.manual_seed(0)
    assert tune.denoising_loss(predict, sched, x0, None, None, g).min() > 1.0


# ---------------------------------------------------------------------------------------------- diffusers host


def test_splice_matches_the_tokenizer(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok", WORDS)
    rare = common.word_ids(tok, "rare")
    s = common.splice(tok, "a photo of sks cat", "sks", rare)
    assert s.ids == tok("a photo of rare cat", padding="max_length", max_length=77).input_ids
    assert s.rows == [4]
    two = common.word_ids(tok, "the beach")
    s2 = common.splice(tok, "sks on the beach, a sks", "sks", two)
    assert s2.rows == [1, 2, 8, 9] and [s2.ids[r] for r in s2.rows] == two * 2
    with pytest.raises(ValueError, match="does not contain the identifier 'sks'"):
        common.splice(tok, "a photo of a cat", "sks", rare)


def test_stage1_gradients_reach_only_the_new_vectors(tmp_path):
    model = make_model(tmp_path)
    snap = snapshot(model)
    init = model.text_encoder.get_input_embeddings().weight[common.word_ids(model.tokenizer, "rare")].detach().clone()
    res = dt.quick_tune(model, images(), "cat", config=tiny_config(4, 0), stage2=False)
    assert res.status == tune.DONE and res.stage1.steps == 4 and res.lora is None
    assert res.embedding.init_word == "rare" and res.embedding.vectors["emb_params"].shape == (1, 32)
    assert not torch.equal(res.embedding.vectors["emb_params"], init), "stage 1 must move the identifier's vector"
    assert_untouched(model, snap)  # the whole vocabulary (and every other weight) bit-identical


def test_two_stages_leave_the_model_untouched_and_files_round_trip(tmp_path):
    model = make_model(tmp_path, latent=True)
    snap = snapshot(model)
    steps = []
    res = dt.quick_tune(model, images(3, 32), "cat", config=tiny_config(3, 3),
                        on_progress=lambda done, n, loss: steps.append((done, n)))
    assert res.status == tune.DONE and steps == [(i, 6) for i in range(1, 7)]
    assert res.lora is not None and res.stage2.steps == 3
    assert_untouched(model, snap)

    x, t = torch.randn(1, 4, 16, 16), torch.tensor([50])
    cond = common.encode_prompt(model, "a photo of sks cat", res.embedding)
    plain = common.encode_prompt(model, "a photo of sks cat")
    assert not torch.allclose(cond, plain), "the learned vector changes the conditioning"
    with torch.no_grad():
        base = model.unet(x, t, encoder_hidden_states=cond).sample
        with dt.tuned(model, res) as unet:
            tuned = unet(x, t, encoder_hidden_states=cond).sample
        assert torch.equal(model.unet(x, t, encoder_hidden_states=cond).sample, base)
    assert not torch.allclose(tuned, base)

    paths = res.save(tmp_path / "out", name="../../my subject")
    assert paths["embedding"].name == "my_subject.safetensors" and paths["embedding"].parent == tmp_path / "out"
    assert paths["lora"].name == "my_subject_lora.safetensors"
    with pytest.raises(FileExistsError):
        res.save(tmp_path / "out", name="my subject")
    emb = load_embedding(paths["embedding"], family="toy", widths={"emb_params": 32})
    assert torch.equal(common.encode_prompt(model, "a photo of sks cat", emb), cond)
    lora = load_lora(paths["lora"], family="toy")
    with torch.no_grad(), dt.tuned(model, lora=lora.lora) as unet:
        assert torch.equal(unet(x, t, encoder_hidden_states=cond).sample, tuned)
    _, meta = read_safetensors(paths["lora"])
    assert meta["identifier"] == "sks" and meta["ss_steps"] == "3" and meta["ss_num_train_images"] == "3"


def test_one_seed_gives_one_result_whatever_ran_before(tmp_path):
    """The LoRA's random init comes from the run's seed: the process's global RNG (which ComfyUI's samplers move)
    changes nothing, and the global RNG is left as it was."""
    model = make_model(tmp_path)
    runs = []
    for before in (0, 1):
        torch.manual_seed(before)
        state = torch.get_rng_state()
        runs.append(dt.quick_tune(model, images(2, 32), "cat", config=tiny_config(1, 2), seed=3))
        assert torch.equal(torch.get_rng_state(), state), "the global RNG untouched"
    a, b = (dict(r.lora.named_parameters()) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = dict(dt.quick_tune(model, images(2, 32), "cat", config=tiny_config(1, 2), seed=4).lora.named_parameters())
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_cancel_stops_within_a_step_and_leaves_the_model_untouched(tmp_path):
    model = make_model(tmp_path)
    snap = snapshot(model)
    calls = []
    res = dt.quick_tune(model, images(), "cat", config=tiny_config(3, 10),
                        should_cancel=lambda: len(calls.append(0) or calls) > 5)
    assert res.status == tune.CANCELLED and res.stage1.steps == 3 and res.stage2.steps == 2
    assert_untouched(model, snap)


def test_nan_loss_stops_and_keeps_the_last_good_vectors(tmp_path):
    model = make_model(tmp_path)
    snap = snapshot(model)
    slots = common.text_slots(model)
    fill = [common.word_ids(model.tokenizer, "rare")]
    enc = common.PromptEncoder.spliced(model, ["a photo of sks cat"], "sks", fill)
    good = common.make_predict({"unet": model.unet})
    calls = []

    def predict(x, t, cond):
        calls.append(0)
        out = good(x, t, cond)
        return out * float("nan") if len(calls) > 3 else out

    seen = []
    init = [slots[0].text_encoder.get_input_embeddings().weight[fill[0]].detach().clone()]
    data = common.cache_images(model, torch.stack(images()))
    with tune.frozen(model.unet, model.text_encoder):
        vectors, r = qt.learn_embedding(init, enc, predict, common.schedule_of(model), data, 1,
                                        qt.StageConfig(10, 1e-2, 2), on_progress=lambda done, n, loss: seen.append(0))
    assert r.status == tune.NAN and r.steps == 3 and "step 4" in r.message
    assert torch.isfinite(vectors[0]).all() and not torch.equal(vectors[0], init[0])
    assert_untouched(model, snap)


def test_sdxl_learns_both_embeddings(tmp_path):
    model = make_sdxl(tmp_path)
    snap = snapshot(model)
    res = dt.quick_tune(model, images(), "cat", config=tiny_config(2, 1), resolution=16)
    assert res.status == tune.DONE
    e = res.embedding
    assert set(e.vectors) == {"clip_l", "clip_g"} and e.widths() == {"clip_l": 32, "clip_g": 48}
    for key, te in (("clip_l", model.text_encoder), ("clip_g", model.text_encoder_2)):
        init = te.get_input_embeddings().weight[common.word_ids(model.tokenizer, "rare")]
        assert not torch.equal(e.vectors[key], init.detach()), f"{key} did not learn"
    cond = common.encode_prompt(model, "a photo of sks cat", e, resolution=16)
    assert cond["encoder_hidden_states"].shape == (1, 77, 80) and cond["text_embeds"].shape == (1, 16)
    assert_untouched(model, snap)


def test_multi_token_init_word_gives_a_multi_vector_embedding(tmp_path, caplog):
    model = make_model(tmp_path)
    with caplog.at_level(logging.INFO):
        res = dt.quick_tune(model, images(), "cat", init_word="the beach", config=tiny_config(1, 0), stage2=False)
    assert res.embedding.num_vectors == 2 and "2 vectors" in caplog.text
    res2 = dt.quick_tune(model, images(), "cat", identifier="zq-9", config=tiny_config(1, 1))
    assert res2.status == tune.DONE and res2.embedding.identifier == "zq-9"


def test_stage2_alone_is_dreambooth_style(tmp_path):
    model = make_model(tmp_path)
    res = dt.quick_tune(model, images(), "cat", config=tiny_config(3, 2), stage1=False)
    own = model.text_encoder.get_input_embeddings().weight[common.word_ids(model.tokenizer, "sks")]
    assert res.stage1 is None and torch.equal(res.embedding.vectors["emb_params"], own.detach())
    # the spliced prompt is then exactly the prompt as the tokenizer reads it
    assert torch.equal(common.encode_prompt(model, "a photo of sks cat", res.embedding),
                       common.encode_prompt(model, "a photo of sks cat"))


def test_full_fine_tune_works_on_a_copy(tmp_path):
    model = make_model(tmp_path)
    snap = snapshot(model)
    res = dt.quick_tune(model, images(), "cat", config=tiny_config(1, 2, mode="full"))
    assert res.lora is None and res.unet_state is not None
    changed = [k for k, v in model.unet.state_dict().items() if not torch.equal(v, res.unet_state[k])]
    assert changed, "full fine-tuning must change denoiser weights (of the copy)"
    assert_untouched(model, snap)
    paths = res.save(tmp_path / "out")
    assert set(paths) == {"embedding", "unet"}
    tensors, meta = read_safetensors(paths["unet"])
    assert meta["format"] == "boothkit.unet"
    # the file holds the fine-tuned denoiser itself: every key of the model's state, the tuned values
    assert tensors.keys() == model.unet.state_dict().keys()
    for k, v in tensors.items():
        assert torch.equal(v, res.unet_state[k].to(v.dtype)), k
    # and sampling uses it: tuned() gives a copy with exactly those weights, the model's own UNet unchanged
    with dt.tuned(model, res) as unet:
        assert unet is not model.unet
        assert all(torch.equal(unet.state_dict()[k], res.unet_state[k]) for k in changed)
    assert_untouched(model, snap)


def test_prior_preservation_and_masks_run(tmp_path):
    model = make_model(tmp_path)
    masks = [torch.ones(1, 16, 16) for _ in range(3)]
    masks[0][:, :8] = 0
    res = dt.quick_tune(model, images(), "cat", masks=masks, class_images=images(2), config=tiny_config(1, 2))
    assert res.status == tune.DONE and res.training["num_class_images"] == 2 and res.training["masked_loss"]


def test_bad_input_is_reported(tmp_path, caplog):
    model = make_model(tmp_path)
    with pytest.raises(ValueError, match="no training images"):
        dt.quick_tune(model, [], "cat", config=tiny_config())
    with pytest.raises(ValueError, match="equals the class noun"):
        dt.quick_tune(model, images(), "cat", identifier="cat", config=tiny_config())
    with pytest.raises(ValueError, match="single word"):
        dt.quick_tune(model, images(), "cat", identifier="two words", config=tiny_config())
    with pytest.raises(ValueError, match="does not contain the identifier"):
        dt.quick_tune(model, images(), "cat", prompts=["a photo of {class_noun}"], config=tiny_config())
    with pytest.raises(ValueError, match="2 masks for 3 images"):
        dt.quick_tune(model, images(), "cat", masks=[torch.ones(1, 16, 16)] * 2, config=tiny_config())
    with caplog.at_level(logging.INFO):
        res = dt.quick_tune(model, images(2) + [torch.rand(3, 20, 28)], "cat", config=tiny_config(1, 0), stage2=False)
    assert res.status == tune.DONE and "20x28 to 16x16" in caplog.text


def test_output_names_are_sanitised(tmp_path):
    assert files.safe_name("../../etc/passwd") == "passwd"
    assert files.safe_name("my cat (v2).safetensors") == "my_cat_v2"
    assert files.safe_name("..hidden") == "hidden"
    with pytest.raises(ValueError, match="no usable characters"):
        files.safe_name("../..")
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError):
        files.output_paths(tmp_path, "x", ["embedding"])
    paths = files.output_paths(tmp_path, "x", ["embedding", "lora"], overwrite=True)
    assert paths["lora"] == tmp_path / "x_lora.safetensors"


# ------------------------------------------------------------------------------------------------------------ CLI


def write_images(folder, n=3, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_cli_writes_both_files_and_refuses_to_overwrite(tmp_path, capsys):
    from boothkit.commands.tune import main

    sd = tiny_sd_folder(tmp_path / "sd")
    imgs = write_images(tmp_path / "imgs")
    argv = ["--images", str(imgs), "--class-noun", "cat", "--out", str(tmp_path / "out"), "--model", str(sd),
            "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "2", "--init-word", "dog"]
    assert main(argv) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["sks.safetensors", "sks_lora.safetensors"]
    emb = load_embedding(out / "sks.safetensors")
    assert emb.init_word == "dog" and emb.metadata["ss_steps"] == "2"
    assert "embedding:sks cat" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--overwrite"):
        main(argv)
    assert main(argv + ["--overwrite", "--stages", "embedding"]) == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        main(["--images", str(tmp_path / "empty"), "--class-noun", "cat", "--out", str(tmp_path / "o2"), "--model",
              str(sd)])
