"""The quick-tune nodes without ComfyUI: schemas, Save Concept (names, refusals, files that the backend loaders read
back), and the ComfyUI host helpers that need no ComfyUI (images and masks, token checks, the clone patches, and the
autograd helpers that let training run on ComfyUI's inference-mode weights). ComfyUI's modules are stubbed
(tests/comfy_stubs.py); the real-ComfyUI tier is tests/comfyui/test_quicktune_real.py."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfy_stubs import stubbed_comfy
from safetensors.torch import load_file
from torch import nn

from boothkit.backend import quicktune as qt
from boothkit.backend.embedding import Embedding, embedding_metadata, load_embedding
from boothkit.backend.files import read_safetensors
from boothkit.backend.identifier import DEFAULT_IDENTIFIER
from boothkit.backend.lora import LoRA, LoRATensors, kohya_hashes, load_lora, lora_tensors

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("comfy_models")


@pytest.fixture(scope="module")
def pack(models_dir):
    """boothkit.nodes.quicktune (+ host) against stubbed ComfyUI modules, with ComfyUI's embeddings/loras folders."""
    with stubbed_comfy(models_dir, folders=("embeddings", "loras")):
        import boothkit.nodes as nodes
        import boothkit.nodes.quicktune as qt_nodes
        import boothkit.hosts.comfy.common as common
        import boothkit.hosts.comfy.quicktune as host

        yield nodes, qt_nodes, host, common


def inputs_of(schema):
    return {i.id: i for i in schema.inputs}


# ----------------------------------------------------------------------------------------------------------------------
# schemas


def test_both_nodes_are_listed_with_their_ids(pack):
    nodes, qt_nodes, _, _ = pack
    listed = nodes.node_list()
    assert qt_nodes.NODES == [qt_nodes.QuickTuneConcept, qt_nodes.SaveConcept]
    assert all(cls in listed for cls in qt_nodes.NODES)
    schemas = [cls.define_schema() for cls in qt_nodes.NODES]
    assert [s.node_id for s in schemas] == ["BoothKitQuickTuneConcept", "BoothKitSaveConcept"]
    for s in schemas:
        assert s.category.startswith("BoothKit/") and s.display_name and s.description
        for i in s.inputs:
            assert i.tooltip or i.io_type.startswith("BOOTHKIT_"), f"{s.node_id}.{i.id} has no tooltip"


def test_quick_tune_inputs_outputs_and_types(pack):
    _, qt_nodes, _, _ = pack
    s = qt_nodes.QuickTuneConcept.define_schema()
    assert [(i.id, i.io_type, i.optional) for i in s.inputs] == [
        ("model", "MODEL", False), ("clip", "CLIP", False), ("vae", "VAE", False), ("images", "IMAGE", False),
        ("identifier", "STRING", False), ("class_noun", "STRING", False), ("init_word", "STRING", False),
        ("embedding_steps", "INT", False), ("embedding_lr", "FLOAT", False), ("denoiser_steps", "INT", False),
        ("denoiser_lr", "FLOAT", False), ("lora_rank", "INT", False), ("resolution", "INT", False),
        ("seed", "INT", False), ("gradient_checkpointing", "BOOLEAN", False), ("mask", "MASK", True)]
    assert [o.io_type for o in s.outputs] == ["MODEL", "CLIP", "BOOTHKIT_EMBEDDING", "LORA_MODEL", "STRING"]
    assert not s.is_output_node


def test_quick_tune_defaults_are_the_backends(pack):
    """The widgets' defaults are QuickTuneConfig.sd() (kept out of the schema so ComfyUI starts without torch)."""
    _, qt_nodes, _, _ = pack
    i = {k: v.kwargs for k, v in inputs_of(qt_nodes.QuickTuneConcept.define_schema()).items()}
    sd = qt.QuickTuneConfig.sd()
    assert (i["embedding_steps"]["default"], i["embedding_lr"]["default"]) == (sd.stage1.steps, sd.stage1.lr)
    assert (i["denoiser_steps"]["default"], i["denoiser_lr"]["default"]) == (sd.stage2.steps, sd.stage2.lr)
    assert i["lora_rank"]["default"] == sd.rank and i["identifier"]["default"] == DEFAULT_IDENTIFIER
    assert i["init_word"]["default"] == "", "empty: the class noun"
    assert i["embedding_steps"]["min"] == 0 and i["denoiser_steps"]["min"] == 0, "0 skips a stage"
    assert i["resolution"]["default"] == 512 and (i["resolution"]["min"], i["resolution"]["step"]) == (32, 32), "toy: 32"
    # the one default that is not the backend's: on, as in ComfyUI's Train LoRA node (the CLI's flag is off)
    assert i["gradient_checkpointing"]["default"] is True and sd.gradient_checkpointing is False


def test_save_concept_schema_and_name_validation(pack):
    _, qt_nodes, _, _ = pack
    s = qt_nodes.SaveConcept.define_schema()
    i = inputs_of(s)
    assert s.is_output_node
    assert (i["embedding"].io_type, i["embedding"].optional) == ("BOOTHKIT_EMBEDDING", True)
    assert (i["lora"].io_type, i["lora"].optional) == ("LORA_MODEL", True)
    assert i["overwrite"].io_type == "BOOLEAN" and i["overwrite"].kwargs["default"] is False
    assert qt_nodes.SaveConcept.validate_inputs(name="my cat", overwrite=False) is True
    assert "no usable characters" in qt_nodes.SaveConcept.validate_inputs(name="../..", overwrite=False)
    assert qt_nodes.SaveConcept.validate_inputs(name=None) is True, "a linked name is checked when the node runs"


def test_schemas_import_nothing_heavy():
    """ComfyUI start-up builds the schemas: no torch, no backend, no quick-tune host until a node runs."""
    code = (
        "import sys, tempfile; sys.path.insert(0, %r); from comfy_stubs import stub_modules\n"
        "sys.modules.update(stub_modules(tempfile.mkdtemp()))\n"
        "import boothkit.nodes.quicktune as q\n"
        "[c.define_schema() for c in q.NODES]\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'safetensors') or "
        "m.startswith('boothkit.backend') or m.startswith('boothkit.hosts') or m.endswith('_host')])\n"
        % str(ROOT / "tests"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------------------------------
# Save Concept


class SpatialTransformer(nn.Module):  # named like ComfyUI's container: kohya's rule picks its Linear layers
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k = nn.Linear(8, 8), nn.Linear(6, 8)


def tiny_lora(seed=1) -> LoRA:
    root = nn.Module()
    root.block = SpatialTransformer()
    lora = LoRA.for_model(root, rank=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return lora


def concept(seed=0) -> tuple[Embedding, LoRATensors]:
    g = torch.Generator().manual_seed(seed)
    e = Embedding({"emb_params": torch.randn(1, 768, generator=g)}, "sd1", "sks", "cat")
    e.metadata = embedding_metadata(e, {"stage1_steps": 100, "name": "sks"}, "epsilon")
    return e, lora_tensors(tiny_lora(seed + 1), "sd1", "sks", {"stage2_steps": 300, "name": "sks"})


def test_save_concept_writes_files_the_backend_loaders_read(pack, models_dir):
    _, qt_nodes, _, _ = pack
    e, lora = concept()
    out = qt_nodes.SaveConcept.execute(name="my cat", overwrite=False, embedding=e, lora=lora)
    emb_path = models_dir / "embeddings" / "my_cat.safetensors"
    lora_path = models_dir / "loras" / "my_cat_lora.safetensors"
    assert out.args == (f"{emb_path}\n{lora_path}",) and out.ui == {"text": [f"{emb_path}\n{lora_path}"]}
    loaded = load_embedding(emb_path, family="sd1", widths={"emb_params": 768})
    assert torch.equal(loaded.vectors["emb_params"], e.vectors["emb_params"]) and loaded.identifier == "sks"
    named = {"ss_output_name": "my_cat", "modelspec.title": "my_cat"}
    assert e.metadata["ss_output_name"] == "sks"
    assert loaded.metadata == {**e.metadata, **named}, "the training-time metadata, named after the file"
    lf = load_lora(lora_path, family="sd1")
    assert lf.metadata == {**lora.metadata, **named} and lf.identifier == "sks"
    assert e.metadata["ss_output_name"] == lora.metadata["ss_output_name"] == "sks", "the inputs are not changed"
    assert {k: torch.equal(v, lora.tensors[k]) for k, v in load_file(lora_path).items()} == \
        {k: True for k in lora.tensors}


def test_save_concept_refuses_to_overwrite_unless_told(pack, tmp_path):
    _, _, host, _ = pack
    e, lora = concept()
    emb_dir, lora_dir = tmp_path / "embeddings", tmp_path / "loras"
    host.save_concept(None, lora, "subject", False, emb_dir, lora_dir)  # only the LoRA exists now
    before = (lora_dir / "subject_lora.safetensors").read_bytes()
    e2, lora2 = concept(seed=5)
    with pytest.raises(FileExistsError, match=r"subject_lora\.safetensors already exist.*'overwrite'.*nothing was "
                                              r"written"):
        host.save_concept(e2, lora2, "subject", False, emb_dir, lora_dir)
    assert not (emb_dir / "subject.safetensors").exists(), "refused before anything was written"
    assert (lora_dir / "subject_lora.safetensors").read_bytes() == before
    host.save_concept(e2, lora2, "subject", True, emb_dir, lora_dir)
    assert torch.equal(load_file(lora_dir / "subject_lora.safetensors")[next(iter(lora2.tensors))],
                       next(iter(lora2.tensors.values())))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["embeddings", "loras", "subject.safetensors",
                                                          "subject_lora.safetensors"], "no temp files left"


@pytest.mark.parametrize("name, stem", [("../../etc/passwd", "passwd"), ("my cat!", "my_cat"),
                                        ("C:\\Users\\x\\sks.safetensors", "sks"), (".hidden", "hidden")])
def test_save_concept_sanitises_names(pack, tmp_path, name, stem):
    _, _, host, _ = pack
    e, _ = concept()
    (path,) = host.save_concept(e, None, name, False, tmp_path / "emb", tmp_path / "lora")
    assert path == tmp_path / "emb" / f"{stem}.safetensors" and path.is_file()


def test_save_concept_reports_nothing_or_wrong_inputs(pack, tmp_path):
    _, _, host, _ = pack
    with pytest.raises(ValueError, match="nothing to save"):
        host.save_concept(None, None, "x", False, tmp_path, tmp_path)
    with pytest.raises(TypeError, match="BoothKit LoRA"):
        host.save_concept(None, {"a": torch.zeros(1)}, "x", False, tmp_path, tmp_path)
    with pytest.raises(ValueError, match="no usable characters"):
        host.save_concept(concept()[0], None, "///", False, tmp_path, tmp_path)


def test_lora_tensors_rename_layers_and_hash_the_final_file(tmp_path):
    lora = tiny_lora()
    plain = lora_tensors(lora, "sd1", "sks")
    names = {"lora_unet_block_to_q": "lora_unet_down_blocks_0_attentions_0_to_q"}
    renamed = lora_tensors(lora, "sd1", "sks", names=names)
    assert set(renamed.tensors) == {k.replace("lora_unet_block_to_q", names["lora_unet_block_to_q"])
                                    for k in plain.tensors}
    path = renamed.save(tmp_path / "a.safetensors")
    tensors, meta = read_safetensors(path)
    assert meta == renamed.metadata and set(tensors) == set(renamed.tensors)
    content = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(tensors, content), \
        "kohya's hashes of the file as written"
    # computed here from the file's bytes, as kohya's precalculate_safetensors_hashes does: sha256 of everything
    # after the header (the tensor data: the header's other metadata does not change it), and the legacy hash of the
    # 64 KiB at offset 1 MiB, which a file this small does not reach (the sha256 of no bytes)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert len(data) < 0x100000 and meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]
    with pytest.raises(FileExistsError, match="overwrite"):
        renamed.save(path)


# ----------------------------------------------------------------------------------------------------------------------
# images and masks


def test_images_are_squared_with_a_note_and_masks_follow(pack):
    _, _, _, host = pack
    images = torch.rand(2, 40, 60, 3)
    masks = torch.zeros(1, 20, 30)
    masks[0, 5:15, 10:20] = 1  # one mask for both images, at another size
    pixels, pmasks, note = host.prepare(images, masks, 32)
    assert pixels.shape == (2, 3, 32, 32) and pmasks.shape == (2, 1, 32, 32)
    assert note == "resized 2 image(s) of size 60x40 to 32x32 (shorter side, centre crop)"
    assert pmasks[0, 0, 16, 16] == 1 and pmasks[0, 0, 0, 0] == 0
    same, _, note = host.prepare([torch.rand(1, 32, 32, 3), torch.rand(32, 32, 4)], None, 32)
    assert same.shape == (2, 3, 32, 32) and note == "", "a list of batches; RGBA drops alpha; right size: no note"


def test_image_and_mask_errors_are_clear(pack):
    _, _, _, host = pack
    with pytest.raises(ValueError, match="no images"):
        host.prepare(torch.zeros(0, 64, 64, 3), None, 64)
    with pytest.raises(ValueError, match=r"IMAGE batch \[N, H, W, 3\]"):
        host.prepare(torch.rand(2, 3, 64, 64)[..., :2], None, 64)
    with pytest.raises(ValueError, match="3 masks for 2 images"):
        host.prepare(torch.rand(2, 8, 8, 3), torch.ones(3, 8, 8), 8)
    with pytest.raises(ValueError, match="mask 1 is empty.*leave the mask unconnected"):
        host.prepare(torch.rand(2, 8, 8, 3), torch.stack([torch.ones(8, 8), torch.zeros(8, 8)]), 8)


# ----------------------------------------------------------------------------------------------------------------------
# the CLIP: token checks and the clone's "set" patch


class FakeEncoder(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.token_embedding = nn.Embedding(50, width)
        self.transformer.get_input_embeddings = lambda: self.transformer.token_embedding


class FakeClip:
    """ComfyUI CLIP's contract: tokenize -> {key: [[(id, weight, word_id), ...]]}, cond_stage_model.clip_<key>, clone()
    sharing the model, add_patches returning the keys it matched."""
    VOCAB = {"sks": [7], "cat": [9], "a": [3], "qzx": [11, 12], "orange": [13]}

    def __init__(self, widths=(("l", 8),)):
        self.cond_stage_model = nn.Module()
        for key, width in widths:
            setattr(self.cond_stage_model, f"clip_{key}", FakeEncoder(width))
        self.keys, self.patches = [k for k, _ in widths], {}

    def tokenize(self, text, return_word_ids=False):
        words = [(t, w + 1) for w, word in enumerate(text.split()) for t in self.VOCAB[word]]
        chunk = [(1, 1.0, 0)] + [(t, 1.0, w) for t, w in words] + [(2, 1.0, 0)]
        return {k: [chunk if return_word_ids else [c[:2] for c in chunk]] for k in self.keys}

    def clone(self):
        c = FakeClip.__new__(FakeClip)
        c.cond_stage_model, c.keys, c.patches = self.cond_stage_model, self.keys, dict(self.patches)
        return c

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        sd = self.cond_stage_model.state_dict()
        added = [k for k in patches if k[0] in sd]
        for k in added:
            self.patches[k] = patches[k]
        return added


def test_text_slots_follow_the_family_and_check_widths(pack):
    _, _, _, host = pack
    (slot,) = host.text_slots(FakeClip(), "sd1")
    assert (slot.key, slot.comfy_key, slot.weight_key, slot.width) == \
        ("emb_params", "l", "clip_l.transformer.token_embedding.weight", 8)
    xl = host.text_slots(FakeClip((("g", 12), ("l", 8))), "sdxl")
    assert [(s.key, s.comfy_key, s.width) for s in xl] == [("clip_l", "l", 8), ("clip_g", "g", 12)]
    with pytest.raises(ValueError, match=r"text encoders \['l'\].*sdxl model"):
        host.text_slots(FakeClip(), "sdxl")
    model = type("M", (), {})()
    model.model = type("B", (), {"model_config": type("C", (), {"unet_config": {"context_dim": 768}})()})()
    with pytest.raises(ValueError, match=r"\[8\] wide.*takes 768"):
        host.text_slots(FakeClip(), "sd1", model)


def test_identifier_and_init_word_must_be_one_token(pack):
    _, _, _, host = pack
    clip = FakeClip((("g", 12), ("l", 8)))
    slots = host.text_slots(clip, "sdxl")
    assert host.token_ids(clip, slots, "sks", "identifier") == [7, 7]
    with pytest.raises(ValueError, match=r"identifier 'qzx' is 2 tokens for the text encoder CLIP-L.*e\.g\. sks"):
        host.token_ids(clip, slots, "qzx", "identifier")
    with pytest.raises(ValueError, match=r"init word 'orange cat' is 2 tokens.*the class noun"):
        host.token_ids(clip, slots, "orange cat", "init word")


def test_returned_clip_is_a_clone_with_one_row_set(pack):
    _, _, _, host = pack
    clip = FakeClip((("g", 12), ("l", 8)))
    slots = host.text_slots(clip, "sdxl")
    vectors = [torch.randn(1, 8), torch.randn(1, 12)]
    out = host.apply_embedding(clip, slots, [7, 7], vectors)
    assert clip.patches == {}, "the input CLIP gets no patch"
    assert set(out.patches) == {("clip_l.transformer.token_embedding.weight", (0, 7, 1)),
                                ("clip_g.transformer.token_embedding.weight", (0, 7, 1))}
    kind, (value,) = out.patches[("clip_g.transformer.token_embedding.weight", (0, 7, 1))]
    assert kind == "set" and torch.equal(value, vectors[1])


def test_prompt_encoder_puts_the_vectors_in_the_identifiers_place(pack):
    _, _, _, host = pack
    clip = FakeClip()
    slots = host.text_slots(clip, "sd1")
    enc = host.PromptEncoder(clip, slots, ["a sks cat"], "sks", [7])
    v = torch.randn(1, 8)
    (chunk,) = enc.tokens_with([v], 0)["l"]
    assert [t[0] for t in chunk if isinstance(t[0], int)] == [1, 3, 9, 2] and chunk[2][0] is v
    with pytest.raises(ValueError, match="does not contain the identifier 'sks'"):
        host.PromptEncoder(clip, slots, ["a cat"], "sks", [7])


# ----------------------------------------------------------------------------------------------------------------------
# autograd on ComfyUI's weights


class CastLinear(nn.Linear):
    """ComfyUI's op contract (comfy/ops.py): a class-level ``weight_function`` list; when non-empty, forward runs
    the weight through it."""
    weight_function: list = []
    bias_function: list = []

    def forward(self, x):
        w, b = self.weight, self.bias
        for f in self.weight_function:
            w = f(w.to(copy=True))
        for f in self.bias_function:
            b = f(b.to(copy=True))
        return nn.functional.linear(x, w, b)


def test_trainable_lets_autograd_use_inference_mode_weights_and_puts_everything_back(pack):
    _, _, _, host = pack
    with torch.inference_mode():  # ComfyUI's executor loads checkpoints like this
        layer = CastLinear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        layer(x * 2).sum().backward()
    with host.frozen(layer), host.trainable(layer):  # as quick_tune uses them
        layer(x).pow(2).sum().backward()
    with torch.no_grad():
        want = 2 * layer(x) @ layer.weight
    assert torch.allclose(x.grad, want)
    assert "weight_function" not in layer.__dict__ and "bias_function" not in layer.__dict__
    assert CastLinear.weight_function == [] and CastLinear.bias_function == [], "the class default is untouched"
    with torch.inference_mode():
        own = CastLinear(4, 4)
    own.weight_function = [torch.neg]  # a function ComfyUI put there (a LoRA in low-VRAM mode) stays, in order
    with host.trainable(own):
        assert own.weight_function[0] is torch.neg and len(own.weight_function) == 2
    assert own.weight_function == [torch.neg]


def test_frozen_sets_back_requires_grad_of_inference_tensors(pack):
    _, _, _, host = pack
    with torch.inference_mode():
        layer = nn.Linear(3, 3)
    assert layer.weight.requires_grad and layer.weight.is_inference()
    with host.frozen(layer):
        assert not any(p.requires_grad for p in layer.parameters())
    assert all(p.requires_grad for p in layer.parameters())


def test_saved_copies_make_in_place_residuals_differentiable(pack):
    """ComfyUI's CLIP layers do ``x += attn(norm(x))``; with saved tensors copied, the gradient is the out-of-place
    one."""
    _, _, _, host = pack
    norm = nn.LayerNorm(6)
    v = torch.randn(3, 6, requires_grad=True)

    def in_place(a):
        x = a * 1
        x += norm(x).pow(2)
        x += norm(x).pow(2)
        return x.pow(3).sum()

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        in_place(v).backward()
    v.grad = None
    with host.saved_copies():
        in_place(v).backward()
    got, v.grad = v.grad, None
    x = v * 1
    x = x + norm(x).pow(2)
    x = x + norm(x).pow(2)
    x.pow(3).sum().backward()
    assert torch.allclose(got, v.grad, atol=1e-6)


def test_lora_layer_names_from_file_keys(pack):
    _, _, _, host = pack
    assert host.lora_layers(["lora_unet_a.lora_down.weight", "lora_unet_a.alpha", "lora_unet_b.diff",
                             "lora_unet_c.lora_up.weight"]) == {"lora_unet_a", "lora_unet_b", "lora_unet_c"}
