"""Quick-Tune Concept's and E4T Tune's ``execute()`` in the default tier: the node schemas and host against stubbed
ComfyUI (tests/comfy_stubs.py) and a small fake of the ComfyUI objects they train on (tests/fake_comfy.py). The
input MODEL, CLIP (and E4T file) are left exactly as they were (a success, a Cancel, a non-finite loss), the outputs
carry the patches, a non-finite loss stops with the last good state and says so. The real-ComfyUI tier runs the
same nodes in ComfyUI."""
import pytest
import torch
from comfy_stubs import stubbed_comfy
from fake_comfy import (CLIP, VAE, BaseModel, ClipVision, InterruptProcessingException, ModelPatcher, e4t_file,
                        fake_comfy, same, snapshot)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def node(tmp_path, monkeypatch):
    with stubbed_comfy(tmp_path, folders=("embeddings", "loras")), fake_comfy(monkeypatch) as interrupt:
        from boothkit.nodes.quicktune import QuickTuneConcept

        yield QuickTuneConcept, interrupt


@pytest.fixture
def e4t_node(tmp_path, monkeypatch):
    with stubbed_comfy(tmp_path, folders=("e4t",)), fake_comfy(monkeypatch) as interrupt:
        from boothkit.nodes.e4t import E4TTune

        yield E4TTune, interrupt


def inputs(steps=(2, 2)):
    torch.manual_seed(0)
    model, clip = ModelPatcher(BaseModel()), CLIP()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 64, 64, 3, generator=g)
    kwargs = dict(model=model, clip=clip, vae=VAE(), images=images, identifier="sks", class_noun="cat",
                  init_word="dog", embedding_steps=steps[0], embedding_lr=5e-3, denoiser_steps=steps[1],
                  denoiser_lr=1e-3, lora_rank=2, resolution=64, seed=0, gradient_checkpointing=False)
    return kwargs, snapshot(model.model, clip.cond_stage_model)


def test_quick_tune_concept_returns_patched_clones_and_leaves_the_inputs(node):
    QuickTuneConcept, _ = node
    kwargs, before = inputs()
    model, clip = kwargs["model"], kwargs["clip"]
    out = QuickTuneConcept.execute(**kwargs)
    model_out, clip_out, embedding, lora, report = out.args
    assert same(before, model.model, clip.cond_stage_model), "input weights, flags and hooks as they were"
    assert model.patches == {} and clip.patches == {}, "no patch on the inputs"
    assert model_out is not model and clip_out is not clip
    lora_layers = {k.rsplit(".", 2)[0] for k in lora.tensors if k.endswith(".lora_up.weight")}
    assert len(lora_layers) == 16, "4 Linear layers in each of the 4 SpatialTransformers"
    assert len(model_out.patches) == 16 and all(k.startswith("diffusion_model.") for k in model_out.patches)
    (key, value), = clip_out.patches.items()
    assert key == ("clip_l.transformer.embeddings.token_embedding.weight", (0, 5, 1)), "the identifier's row"
    vector = value[0][1][1][0]
    assert torch.equal(vector, embedding.vectors["emb_params"].float())
    dog = clip.cond_stage_model.clip_l.transformer.embeddings.token_embedding.weight[7]
    assert not torch.equal(vector.flatten(), dog), "stage 1 moved the vector from its init word"
    assert "Quick-Tune finished" in report and "2/2 steps" in report


def test_cancel_raises_and_leaves_the_inputs(node):
    QuickTuneConcept, interrupt = node
    kwargs, before = inputs(steps=(5, 5))
    interrupt.after = 3  # a few checks pass (set-up and the first steps), then Cancel
    with pytest.raises(InterruptProcessingException):
        QuickTuneConcept.execute(**kwargs)
    assert interrupt.checks == 4
    assert same(before, kwargs["model"].model, kwargs["clip"].cond_stage_model)
    assert kwargs["model"].patches == {} and kwargs["clip"].patches == {}


def test_non_finite_loss_stops_with_the_last_good_state(node):
    QuickTuneConcept, _ = node
    kwargs, before = inputs(steps=(3, 3))
    unet = kwargs["model"].model.diffusion_model
    unet.nan_after = 4  # stage 1's steps are fine, stage 2 diverges
    out = QuickTuneConcept.execute(**kwargs)
    model_out, clip_out, embedding, lora, report = out.args
    # stage 1: 3 UNet calls; stage 2's first step is call 4, its second call 5 is NaN: stopped there, step 1 kept
    assert "stage 2 (denoiser LoRA): 1/3 steps" in report, report
    assert "stopped: loss is nan at step 2; kept the state after step 1" in report, report
    assert torch.isfinite(embedding.vectors["emb_params"]).all()
    assert lora is None or all(torch.isfinite(v).all() for v in lora.tensors.values())
    unet.nan_after = None
    assert same(before, kwargs["model"].model, kwargs["clip"].cond_stage_model)
    assert kwargs["model"].patches == {} and kwargs["clip"].patches == {}


def e4t_inputs(steps=2):
    torch.manual_seed(0)
    model, clip, e4t = ModelPatcher(BaseModel()), CLIP(), e4t_file()
    g = torch.Generator().manual_seed(1)
    kwargs = dict(e4t=e4t, model=model, clip=clip, clip_vision=ClipVision(), vae=VAE(),
                  image=torch.rand(1, 64, 64, 3, generator=g), steps=steps, learning_rate=1e-3, identifier="sks",
                  class_noun="cat", resolution=64, seed=0, gradient_checkpointing=False)
    return kwargs, snapshot(model.model, clip.cond_stage_model, e4t)


def test_e4t_tune_returns_patched_clones_and_leaves_the_inputs(e4t_node):
    E4TTune, _ = e4t_node
    kwargs, before = e4t_inputs()
    model, clip = kwargs["model"], kwargs["clip"]
    model_out, clip_out, embedding, lora, report, concept = E4TTune.execute(**kwargs).args
    assert same(before, model.model, clip.cond_stage_model, kwargs["e4t"]), "inputs and the loaded E4T as they were"
    assert model.patches == {} and clip.patches == {}
    assert len(model_out.patches) == 16, "one weight diff per offset target"
    (key, value), = clip_out.patches.items()
    assert key == ("clip_l.transformer.embeddings.token_embedding.weight", (0, 5, 1))
    vector = value[0][1][1][0]
    assert torch.equal(vector, embedding.vectors["emb_params"].float())
    cat = clip.cond_stage_model.clip_l.transformer.embeddings.token_embedding.weight[6]
    assert not torch.equal(vector.flatten(), cat), "the tune moved the identifier away from the class word"
    diffs = {k: v for k, v in lora.items() if k.endswith(".diff")}  # a LORA_MODEL: ComfyUI's state dict
    assert len(diffs) == 16 and any(float(v.abs().sum()) > 0 for v in diffs.values()), "the tune moved the offsets"
    assert all(p[0][1][0] == "diff" for p in model_out.patches.values()), "weight diffs, as LoraLoader applies them"
    assert report.startswith("E4T finished: 2/2 steps"), report
    assert concept.embedding is embedding and len(concept.offsets.names) == 16, "the compact concept: every offset"


def test_e4t_tune_cancel_raises_and_leaves_the_inputs(e4t_node):
    E4TTune, interrupt = e4t_node
    kwargs, before = e4t_inputs(steps=5)
    interrupt.after = 2
    with pytest.raises(InterruptProcessingException):
        E4TTune.execute(**kwargs)
    assert interrupt.checks == 3
    assert same(before, kwargs["model"].model, kwargs["clip"].cond_stage_model, kwargs["e4t"])
    assert kwargs["model"].patches == {} and kwargs["clip"].patches == {}


def test_e4t_tune_non_finite_loss_stops_and_leaves_the_inputs(e4t_node):
    E4TTune, _ = e4t_node
    kwargs, before = e4t_inputs(steps=4)
    unet = kwargs["model"].model.diffusion_model
    unet.nan_after = 0
    model_out, clip_out, embedding, lora, report, concept = E4TTune.execute(**kwargs).args
    assert "stopped (nan)" in report and "0/4 steps" in report, report
    unet.nan_after = None
    assert same(before, kwargs["model"].model, kwargs["clip"].cond_stage_model, kwargs["e4t"])
    assert kwargs["model"].patches == {} and kwargs["clip"].patches == {}
