"""The ComfyUI nodes without ComfyUI: schemas, the example workflows against them, and the ComfyUI host code (the
middle_patch, the layout read from a ComfyUI-shaped UNet, the concept token rows) driven by backend objects and
compared with the diffusers host. ComfyUI's modules are stubbed (tests/comfy_stubs.py); the real-ComfyUI tier is
tests/comfyui/."""
from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfy_stubs import stubbed_comfy
from torch import nn

from boothkit.backend.files import FormatError
from boothkit.backend.instantbooth import save_instantbooth
from boothkit.backend.instantbooth import AdapterLayout, Concept, InstantBooth, InstantBoothConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models only
ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIRS = [ROOT / "workflows"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("comfy_models")


@pytest.fixture(scope="module")
def pack(models_dir):
    """boothkit.nodes imported against stubbed ComfyUI modules; removed again afterwards so nothing leaks."""
    with stubbed_comfy(models_dir):
        import boothkit.nodes as nodes
        import boothkit.nodes.instantbooth as ib_nodes
        import boothkit.hosts.comfy.instantbooth as host

        yield nodes, ib_nodes, host


def schemas(pack):
    nodes, _, _ = pack
    return {cls.define_schema().node_id: cls.define_schema() for cls in nodes.node_list()}


# ----------------------------------------------------------------------------------------------------------------------
# schemas and the extension


def test_every_node_is_listed_prefixed_and_in_a_boothkit_category(pack):
    nodes, ib_nodes, _ = pack
    listed = asyncio.run(nodes.BoothKitExtension().get_node_list())
    assert listed[: len(ib_nodes.NODES)] == ib_nodes.NODES
    ids = [cls.define_schema().node_id for cls in listed]
    assert len(set(ids)) == len(ids)
    assert set(ids) >= {"BoothKitLoadInstantBooth", "BoothKitInstantBoothEncodeConcept", "BoothKitInstantBoothApply",
                        "BoothKitInstantBoothCondition", "BoothKitQuickTuneConcept", "BoothKitSaveConcept",
                        "BoothKitLoadE4T", "BoothKitE4TTune"}
    categories = set()
    for cls in listed:
        s = cls.define_schema()
        assert s.node_id.startswith("BoothKit") and s.display_name and s.description
        assert s.category.startswith("BoothKit/"), f"{s.node_id}: category {s.category!r}"
        categories.add(s.category)
        ids_ = [i.id for i in s.inputs] + [o.id for o in s.outputs if o.id]
        assert len(set(ids_)) == len(ids_), f"{s.node_id}: duplicate input/output ids"
    assert categories == {"BoothKit/InstantBooth", "BoothKit/E4T", "BoothKit/quick-tune", "BoothKit/concepts",
                          "BoothKit/toy world"}


# ComfyUI's own link types; every other type a node declares is BoothKit's and carries its prefix
COMFY_TYPES = {"MODEL", "CLIP", "VAE", "CLIP_VISION", "CONDITIONING", "IMAGE", "MASK", "LATENT", "LORA_MODEL", "INT",
               "FLOAT", "STRING", "BOOLEAN", "COMBO", "HOOKS"}


def test_every_input_and_output_has_a_tooltip_and_custom_types_are_prefixed(pack):
    for node_id, s in schemas(pack).items():
        for slot in list(s.inputs) + list(s.outputs):
            name = slot.id or slot.display_name or slot.io_type
            assert slot.tooltip and len(slot.tooltip) > 10, f"{node_id}.{name}: no tooltip"
            assert slot.io_type in COMFY_TYPES or slot.io_type.startswith("BOOTHKIT_"), f"{node_id}.{name}: " \
                                                                                          f"{slot.io_type}"


def test_the_lora_outputs_are_comfyuis_lora_model(pack):
    """ComfyUI's Load LoRA Model / Save LoRA take what Quick-Tune Concept and E4T Tune give, and Save Concept takes it
    back (with the file's metadata); a LORA_MODEL without it (Train LoRA's) is refused with the node that saves it."""
    s = schemas(pack)
    for node_id in ("BoothKitQuickTuneConcept", "BoothKitE4TTune"):
        assert {o.display_name: o.io_type for o in s[node_id].outputs}["lora"] == "LORA_MODEL"
    assert {i.id: i.io_type for i in s["BoothKitSaveConcept"].inputs}["lora"] == "LORA_MODEL"
    import boothkit.hosts.comfy.common as common
    from boothkit.backend.lora import LoRATensors

    lora = LoRATensors({"lora_unet_x.lora_up.weight": torch.ones(4, 2)}, {"format": "boothkit.lora"})
    value = common.as_lora_model(lora)
    assert isinstance(value, dict) and torch.equal(value["lora_unet_x.lora_up.weight"], torch.ones(4, 2))
    back = common.from_lora_model(value)
    assert back.metadata == lora.metadata and set(back.tensors) == set(lora.tensors)
    with pytest.raises(TypeError, match="Save LoRA"):
        common.from_lora_model({"x.lora_up.weight": torch.ones(1)})


def test_model_folders_are_created_and_the_loaders_list_the_toy_files(pack, models_dir):
    nodes, ib_nodes, _ = pack
    assert (models_dir / "instantbooth").is_dir() and (models_dir / "e4t").is_dir()
    s = schemas(pack)
    for node_id, name, folder in (("BoothKitLoadInstantBooth", "instantbooth_name", "instantbooth"),
                                  ("BoothKitLoadE4T", "e4t_name", "e4t")):
        combo = {i.id: i for i in s[node_id].inputs}[name]
        assert combo.options[-1] == nodes.TOY_FILES[folder], combo.options
        assert f"models/{folder}" in s[node_id].description and "refresh" in s[node_id].description
    assert ib_nodes.LoadInstantBooth.validate_inputs("toy_instantbooth.safetensors") is True
    assert "not in models/instantbooth" in ib_nodes.LoadInstantBooth.validate_inputs("nothing.safetensors")


def test_the_quicktune_nodes_are_listed(pack):
    nodes, _, _ = pack
    import boothkit.nodes.quicktune as qt_nodes

    listed = nodes.node_list()
    assert [cls for cls in listed if cls in qt_nodes.NODES] == qt_nodes.NODES


def test_defaults_match_the_paper(pack):
    s = schemas(pack)
    apply = {i.id: i for i in s["BoothKitInstantBoothApply"].inputs}
    cond = {i.id: i for i in s["BoothKitInstantBoothCondition"].inputs}
    # 0 = the file's value, read one way in every node and command (the paper's 0.3 / 0.4 are the trainer's defaults)
    assert apply["beta"].kwargs["default"] == 0 and cond["alpha"].kwargs["default"] == 0
    assert "file's" in apply["beta"].tooltip and "file's" in cond["alpha"].tooltip
    assert (apply["start_percent"].kwargs["default"], apply["end_percent"].kwargs["default"]) == (0.0, 1.0)
    assert [i.io_type for i in s["BoothKitInstantBoothApply"].inputs[:2]] == ["MODEL", "BOOTHKIT_INSTANTBOOTH_CONCEPT"]
    enc = {i.id: i for i in s["BoothKitInstantBoothEncodeConcept"].inputs}
    assert enc["masks"].optional and not enc["images"].optional


def test_e4t_nodes_follow_the_paper_and_take_one_image(pack):
    s = schemas(pack)
    tune = {i.id: i for i in s["BoothKitE4TTune"].inputs}
    assert tune["steps"].kwargs["default"] == 15 and tune["learning_rate"].kwargs["default"] == 0.0
    assert [i.io_type for i in s["BoothKitE4TTune"].inputs[:6]] == ["BOOTHKIT_E4T", "MODEL", "CLIP", "CLIP_VISION",
                                                                     "VAE", "IMAGE"]
    assert tune["mask"].optional
    checkpointing = tune["gradient_checkpointing"]
    assert checkpointing.io_type == "BOOLEAN" and checkpointing.kwargs["default"] is True
    assert [o.io_type for o in s["BoothKitE4TTune"].outputs] == ["MODEL", "CLIP", "BOOTHKIT_EMBEDDING",
                                                                 "LORA_MODEL", "STRING", "BOOTHKIT_E4T_CONCEPT"]
    assert [i.io_type for i in s["BoothKitLoadE4TConcept"].inputs] == ["COMBO", "MODEL", "CLIP"]
    assert {i.id: i.io_type for i in s["BoothKitSaveConcept"].inputs}["e4t_concept"] == "BOOTHKIT_E4T_CONCEPT"
    nodes, _, _ = pack
    assert nodes.MODEL_FOLDERS["e4t"] == {".safetensors"}, "models/e4t holds safetensors only"


def test_importing_the_nodes_imports_nothing_heavy():
    """What ComfyUI runs at start-up: the package, nodes/__init__, the node list and every schema. No torch, no
    backend, no kornia (they load when a node runs)."""
    code = (
        "import sys, tempfile; sys.path.insert(0, %r); from comfy_stubs import stub_modules\n"
        "sys.modules.update(stub_modules(tempfile.mkdtemp()))\n"
        "import boothkit.nodes as n\n"
        "[c.define_schema() for c in n.node_list()]\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'kornia', 'diffusers', 'transformers', "
        "'safetensors') or m.startswith('boothkit.backend') or m.startswith('boothkit.hosts')]\n"
        "print(bad)\n" % str(ROOT / "tests"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------------------------------
# workflows: every node type and widget value matches the schema

# the stock ComfyUI nodes the workflows use: widget inputs in order, (name, kind, options/range)
CORE_WIDGETS = {
    "CheckpointLoaderSimple": [("ckpt_name", "FILE", None)],
    "CLIPVisionLoader": [("clip_name", "FILE", None)],
    "LoadImage": [("image", "FILE", None), ("upload", "UPLOAD", None)],
    "CLIPTextEncode": [("text", "STRING", None)],
    "EmptyLatentImage": [("width", "INT", (16, 16384)), ("height", "INT", (16, 16384)),
                         ("batch_size", "INT", (1, 4096))],
    "KSampler": [("seed", "INT", (0, 2**64 - 1)), ("control_after_generate", "CONTROL", None),
                 ("steps", "INT", (1, 10000)), ("cfg", "FLOAT", (0.0, 100.0)), ("sampler_name", "STRING", None),
                 ("scheduler", "STRING", None), ("denoise", "FLOAT", (0.0, 1.0))],
    "VAEDecode": [],
    "SaveImage": [("filename_prefix", "STRING", None)],
    "EmptyChromaRadianceLatentImage": [("width", "INT", (16, 16384)), ("height", "INT", (16, 16384)),
                                       ("batch_size", "INT", (1, 4096))],
    "Note": [("text", "STRING", None)],
    "ImageBatch": [],
    "SolidMask": [("value", "FLOAT", (0.0, 1.0)), ("width", "INT", (1, 16384)), ("height", "INT", (1, 16384))],
    "MaskComposite": [("x", "INT", (0, 16384)), ("y", "INT", (0, 16384)),
                      ("operation", "COMBO", ["multiply", "add", "subtract", "and", "or", "xor"])],
    "InvertMask": [],
    "ConditioningSetMask": [("strength", "FLOAT", (0.0, 10.0)), ("set_cond_area", "COMBO", ["default", "mask bounds"])],
    "ConditioningCombine": [],
}
CORE_OUTPUTS = {
    "CheckpointLoaderSimple": ["MODEL", "CLIP", "VAE"], "CLIPVisionLoader": ["CLIP_VISION"],
    "LoadImage": ["IMAGE", "MASK"], "CLIPTextEncode": ["CONDITIONING"], "EmptyLatentImage": ["LATENT"],
    "KSampler": ["LATENT"], "VAEDecode": ["IMAGE"], "SaveImage": [], "EmptyChromaRadianceLatentImage": ["LATENT"],
    "Note": [], "ImageBatch": ["IMAGE"], "SolidMask": ["MASK"], "MaskComposite": ["MASK"], "InvertMask": ["MASK"],
    "ConditioningSetMask": ["CONDITIONING"], "ConditioningCombine": ["CONDITIONING"],
}


def has_seed_control(i) -> bool:
    """The frontend's rule (useIntWidget): an INT input gets a 'control after generate' widget after it when its
    spec says control_after_generate, or, when the spec does not say, when it is named seed or noise_seed."""
    declared = i.kwargs.get("control_after_generate")
    return i.io_type == "INT" and (declared if declared is not None else i.id in ("seed", "noise_seed"))


def boothkit_widgets(schema) -> list[tuple[str, str, object]]:
    """The widget values the frontend makes for a node, in order."""
    out = []
    for i in schema.inputs:
        if not i.is_widget:
            continue
        if i.io_type == "COMBO":
            out.append((i.id, "FILE" if i.id.endswith("_name") else "COMBO", i.options))
        else:
            lo, hi = i.kwargs.get("min"), i.kwargs.get("max")
            out.append((i.id, i.io_type, (lo, hi) if lo is not None else None))
        if has_seed_control(i):
            out.append(("control_after_generate", "CONTROL", None))
    return out


def test_seeds_declare_their_control_and_tunes_keep_a_fixed_seed(pack):
    """Every INT named seed declares control_after_generate (the frontend's hidden rule is not relied on); the tunes'
    seeds are fixed (no control): a seed that changed after each run would tune again at every Queue."""
    seeds = {(node_id, i.id): i.kwargs.get("control_after_generate") for node_id, s in schemas(pack).items()
             for i in s.inputs if i.io_type == "INT" and "seed" in i.id}
    assert seeds and all(v is not None for v in seeds.values()), seeds
    assert seeds[("BoothKitQuickTuneConcept", "seed")] is False and seeds[("BoothKitE4TTune", "seed")] is False


def workflow_files():
    return sorted(p for d in WORKFLOW_DIRS for p in d.glob("*.json"))


def test_one_template_folder():
    """ComfyUI lists a template once per folder it finds it in (example_workflows/, workflows/, ...): keep one."""
    served = ("example_workflows", "workflow", "workflows", "example", "examples")
    assert [d for d in served if (ROOT / d).is_dir()] == ["workflows"]


@pytest.mark.parametrize("path", workflow_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_workflow_matches_the_schemas(pack, path):
    wf = json.loads(path.read_text())
    assert {"nodes", "links"} <= set(wf), f"{path.name} is not a UI-format workflow"
    s = schemas(pack)
    by_id = {n["id"]: n for n in wf["nodes"]}
    outputs, inputs = {}, {}
    for node in wf["nodes"]:
        t = node["type"]
        values = node.get("widgets_values") or []
        if t in s:
            spec = boothkit_widgets(s[t])
            outputs[node["id"]] = [o.io_type for o in s[t].outputs]
            inputs[node["id"]] = {i.id: i.io_type for i in s[t].inputs if not i.is_widget}
        else:
            assert t in CORE_WIDGETS, f"{path.name}: node type {t!r} is neither BoothKit's nor a known core node"
            spec = CORE_WIDGETS[t]
            outputs[node["id"]] = CORE_OUTPUTS[t]
            inputs[node["id"]] = {i["name"]: i["type"] for i in node.get("inputs", []) if "widget" not in i}
        assert len(values) == len(spec), f"{path.name} node {node['id']} ({t}): {len(values)} widget values, " \
                                         f"schema has {[n for n, _, _ in spec]}"
        for value, (name, kind, rule) in zip(values, spec):
            where = f"{path.name} node {node['id']} ({t}) widget {name}={value!r}"
            if kind == "INT":
                assert isinstance(value, int) and not isinstance(value, bool), where
            elif kind == "FLOAT":
                assert isinstance(value, (int, float)) and not isinstance(value, bool), where
            elif kind in ("STRING", "FILE", "UPLOAD"):
                assert isinstance(value, str) and (kind == "STRING" or value), where
            elif kind == "BOOLEAN":
                assert isinstance(value, bool), where
            elif kind == "COMBO":
                assert value in rule, where
            elif kind == "CONTROL":
                assert value in ("fixed", "increment", "decrement", "randomize"), where
            if kind in ("INT", "FLOAT") and rule is not None:
                assert rule[0] <= value <= rule[1], where
        for slot in node.get("inputs", []):
            if slot.get("link") is None and "widget" not in slot:
                optional = t in s and any(i.id == slot["name"] and i.optional for i in s[t].inputs)
                assert optional, f"{path.name} node {node['id']} ({t}): required input {slot['name']} not connected"
    for link_id, src, src_slot, dst, dst_slot, link_type in wf["links"]:
        src_type = outputs[src][src_slot]
        dst_name = by_id[dst]["inputs"][dst_slot]["name"]
        dst_type = inputs[dst].get(dst_name)
        assert src_type == link_type == dst_type, (f"{path.name} link {link_id}: {by_id[src]['type']} output "
                                                   f"{src_type} -> {by_id[dst]['type']}.{dst_name} ({dst_type}), "
                                                   f"link says {link_type}")
    used = {n["type"] for n in wf["nodes"]}
    assert WORKFLOW_NODES.get(path.name, set()) <= used and any(t.startswith("BoothKit") for t in used), \
        f"{path.name} must show its method's nodes"


# the nodes each method's workflow must show
WORKFLOW_NODES = {
    "instantbooth.json": {"BoothKitLoadInstantBooth", "BoothKitInstantBoothEncodeConcept", "BoothKitInstantBoothApply"},
    "quicktune.json": {"BoothKitQuickTuneConcept", "BoothKitSaveConcept", "CheckpointLoaderSimple", "LoadImage",
                       "CLIPTextEncode", "KSampler", "SaveImage"},
    "e4t.json": {"BoothKitLoadE4T", "BoothKitE4TTune", "BoothKitSaveConcept", "CLIPVisionLoader", "LoadImage",
                 "CLIPTextEncode", "KSampler", "SaveImage"},
    "toy_instantbooth.json": {"BoothKitToyWorldLoader", "BoothKitToySubjectPhotos", "BoothKitLoadInstantBooth",
                              "BoothKitInstantBoothEncodeConcept", "BoothKitInstantBoothApply", "KSampler",
                              "SaveImage"},
    "toy_e4t.json": {"BoothKitToyWorldLoader", "BoothKitToySubjectPhotos", "BoothKitLoadE4T", "BoothKitE4TTune",
                     "KSampler", "SaveImage"},
    "toy_quicktune.json": {"BoothKitToyWorldLoader", "BoothKitToySubjectPhotos", "BoothKitQuickTuneConcept",
                           "KSampler", "SaveImage"},
    "toy_two_subjects.json": {"BoothKitToyWorldLoader", "BoothKitToySubjectPhotos", "BoothKitInstantBoothRegion",
                              "BoothKitInstantBoothApply", "ConditioningSetMask", "ConditioningCombine", "KSampler",
                              "SaveImage"},
    "instantbooth_two_subjects.json": {"BoothKitLoadInstantBooth", "BoothKitInstantBoothRegion",
                                       "BoothKitInstantBoothApply", "ConditioningSetMask", "LoadImage"},
    "toy_compare.json": {"BoothKitToyWorldLoader", "BoothKitToySubjectPhotos", "BoothKitInstantBoothApply",
                         "BoothKitE4TTune", "BoothKitQuickTuneConcept", "SaveImage"},
}


def test_every_method_has_a_toy_template_and_sd_templates_say_what_they_need():
    """A toy template per method (and the comparison) runs with nothing but the pack: it names no file outside it.
    Each SD template carries a Note naming the files it needs and the command that makes them."""
    names = {p.name for p in workflow_files()}
    assert {"toy_instantbooth.json", "toy_e4t.json", "toy_quicktune.json", "toy_compare.json"} <= names
    for path in workflow_files():
        wf = json.loads(path.read_text())
        types = {n["type"] for n in wf["nodes"]}
        notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note"]
        assert len(notes) == 1, f"{path.name}: one Note says what the template needs"
        if "toy" in path.name:
            assert not types & {"CheckpointLoaderSimple", "CLIPVisionLoader", "LoadImage"}, path.name
            files = [v for n in wf["nodes"] for v in n.get("widgets_values") or [] if str(v).endswith(".safetensors")]
            assert all(f.startswith("toy_") for f in files), f"{path.name}: {files}"
        else:
            method = path.stem.split("_")[0]  # instantbooth_two_subjects: InstantBooth's file
            assert "checkpoint" in notes[0] and (method == "quicktune" or f"boothkit train {method}" in notes[0]), \
                f"{path.name}: its Note must name the files and how to make them"


# ----------------------------------------------------------------------------------------------------------------------
# loader


def tiny_config(layout: AdapterLayout, ctx=32, family="toy", vision=(16, 24, 5), **kw) -> InstantBoothConfig:
    return InstantBoothConfig(vision_global_dim=vision[0], vision_token_dim=vision[1], tokens_per_image=vision[2],
                              ctx_dim=ctx, layout=layout, family=family, image_size=32, **kw)


LAYOUT = AdapterLayout(dims=[8, 16, 16, 8], heads=[2, 2, 2, 2], levels=[0, 1, 1, 0], depths=[1, 2, 1])


class FakeModel:
    """The parts of a ComfyUI ModelPatcher the host uses: clone, set_model_patch, model_options, get_model_object,
    model.model_config.unet_config."""

    def __init__(self, diffusion_model, context_dim, sampling=None):
        self.diffusion_model, self.sampling = diffusion_model, sampling
        self.model = type("BaseModel", (), {})()
        self.model.model_config = type("SD15", (), {"unet_config": {"context_dim": context_dim}})()
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = FakeModel(self.diffusion_model, self.model.model_config.unet_config["context_dim"], self.sampling)
        n.model = self.model
        n.model_options = copy.deepcopy(self.model_options)  # as ModelPatcher.clone does
        return n

    def set_model_patch(self, patch, name):
        patches = self.model_options["transformer_options"].setdefault("patches", {})
        patches[name] = patches.get(name, []) + [patch]

    def get_model_object(self, name):
        return {"diffusion_model": self.diffusion_model, "model_sampling": self.sampling}[name]


def test_loader_lists_validates_and_loads(pack, models_dir):
    nodes, ib_nodes, host = pack
    folder = models_dir / "instantbooth"
    save_instantbooth(folder / "ok.safetensors", InstantBooth(tiny_config(LAYOUT, ctx=768, family="sd1")))
    (folder / "notes.txt").write_text("not a model")
    loader = ib_nodes.LoadInstantBooth
    combo = loader.define_schema().inputs[0]
    assert combo.options == ["ok.safetensors", "toy_instantbooth.safetensors"], "only .safetensors, then the toy's"
    assert loader.validate_inputs(instantbooth_name="ok.safetensors") is True
    msg = loader.validate_inputs(instantbooth_name="gone.safetensors")
    assert "gone.safetensors" in msg and "instantbooth" in msg
    (booth,) = loader.execute(instantbooth_name="ok.safetensors").result
    assert booth.name == "ok.safetensors" and isinstance(booth.model, InstantBooth) and not booth.model.training
    sdxl = FakeModel(None, 2048)
    with pytest.raises(FormatError, match=r"ok\.safetensors.*'sd1'.*'sdxl'"):
        loader.execute(instantbooth_name="ok.safetensors", model=sdxl)


# ----------------------------------------------------------------------------------------------------------------------
# the layout of a ComfyUI-shaped UNet


class Downsample(nn.Module):  # named like ComfyUI's openaimodel classes: the host reads levels from the names
    pass


class Upsample(nn.Module):
    pass


class ResBlock(nn.Module):
    def __init__(self, updown=None):
        super().__init__()
        self.updown = updown is not None
        if updown is not None:
            self.h_upd = Downsample() if updown == "down" else Upsample()


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(dim, dim, bias=False)
        self.n_heads = heads


class SpatialTransformer(nn.Module):
    def __init__(self, dim, depth, heads=2):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))


def seq(*layers):
    return nn.Sequential(*layers)


def comfy_like_unet():
    """input: [res+st8] [down] [res+st16(depth 2)]; middle: res+st16+res; output: [res+st16(d2)] [res+st16(d2)+up]
    [res+st8] [res+st8]; levels 0,1 -- what openaimodel builds for an SDXL-like config."""
    m = nn.Module()
    m.input_blocks = nn.ModuleList([seq(ResBlock(), SpatialTransformer(8, 1)), seq(Downsample()),
                                    seq(ResBlock(), SpatialTransformer(16, 2))])
    m.middle_block = seq(ResBlock(), SpatialTransformer(16, 1), ResBlock())
    m.output_blocks = nn.ModuleList([seq(ResBlock(), SpatialTransformer(16, 2)),
                                     seq(ResBlock(), SpatialTransformer(16, 2), Upsample()),
                                     seq(ResBlock(), SpatialTransformer(8, 1)),
                                     seq(ResBlock(), SpatialTransformer(8, 1))])
    return m


def test_layout_of_a_comfy_unet_follows_transformer_index_order(pack):
    _, _, host = pack
    lay = host.unet_adapter_layout(comfy_like_unet())
    assert lay.depths == [1, 2, 1, 2, 2, 1, 1]
    assert lay.dims == [8, 16, 16, 16, 16, 16, 16, 16, 8, 8]
    assert lay.levels == [0, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert lay.index(3, 1) == 5 and lay.index(6, 0) == 9
    m = comfy_like_unet()  # an up/down ResBlock (resblock_updown) changes the level too
    m.input_blocks[1] = seq(ResBlock("down"))
    m.output_blocks[1][2] = ResBlock("up")
    assert host.unet_adapter_layout(m).levels == lay.levels
    with pytest.raises(ValueError, match="not a UNet"):
        host.unet_adapter_layout(nn.Linear(2, 2))


def test_check_model_names_the_file_and_both_families(pack):
    _, _, host = pack
    unet = comfy_like_unet()
    layout = host.unet_adapter_layout(unet)
    booth = host.BoothModel(InstantBooth(tiny_config(layout, ctx=768, family="sd1")), "face.safetensors")
    assert host.check_model(booth, FakeModel(unet, 768)) == layout
    with pytest.raises(ValueError, match=r"face\.safetensors.*'sd1'.*family 'sdxl'"):
        host.check_model(booth, FakeModel(unet, 2048))
    other = host.BoothModel(InstantBooth(tiny_config(LAYOUT, ctx=768, family="sd1")), "other.safetensors")
    with pytest.raises(ValueError, match=r"other\.safetensors.*does not fit.*depths \[1, 2, 1, 2, 2, 1, 1\]"):
        host.check_model(other, FakeModel(unet, 768))


# ----------------------------------------------------------------------------------------------------------------------
# the middle_patch


def make_patch(host, gate=0.5, beta=0.3, layout=LAYOUT, ctx=32, **kw):
    torch.manual_seed(0)
    ib = InstantBooth(tiny_config(layout, ctx=ctx)).eval()
    with torch.no_grad():
        for a in ib.adapters:
            a.gate.fill_(gate)
    f_p = torch.randn(10, ctx)
    return host.InstantBoothPatch(ib, f_p, beta, **kw), ib, f_p


def test_patch_adds_the_adapter_residual_of_the_block_it_is_called_in(pack):
    _, _, host = pack
    patch, ib, f_p = make_patch(host)
    x = torch.randn(2, 12, 16)  # cond + uncond in one batch
    got = patch(x, {"transformer_index": 1, "block_index": 1})
    with torch.no_grad():
        want = ib.adapters[2](x, f_p[None], beta=0.3)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, x, atol=1e-3)


def test_a_file_with_adapters_off_the_unconditional_half_leaves_uncond_chunks_alone(pack):
    _, _, host = pack
    patch, ib, f_p = make_patch(host)
    ib.config.adapters_on_uncond = False
    patch = host.InstantBoothPatch(ib, f_p, 0.3)
    x = torch.randn(4, 12, 16)  # two cond rows, then two uncond rows
    got = patch(x, {"transformer_index": 1, "block_index": 1, "cond_or_uncond": [0, 1]})
    with torch.no_grad():
        want = ib.adapters[2](x, f_p[None], beta=0.3)
    assert torch.allclose(got[:2], want[:2], atol=1e-6) and torch.equal(got[2:], x[2:])


def test_gamma_zero_is_exact_and_skipped_blocks_return_the_input(pack):
    _, _, host = pack
    patch, _, _ = make_patch(host, gate=0.0)
    x = torch.randn(2, 12, 8)
    assert torch.equal(patch(x, {"transformer_index": 0, "block_index": 0}), x)
    patch, _, _ = make_patch(host, enabled=LAYOUT.select(skip_levels=[0]))
    assert patch(x, {"transformer_index": 0}) is x
    assert not torch.equal(patch(torch.randn(2, 12, 16), {"transformer_index": 1, "block_index": 0}), x)


def test_patch_survives_clone_and_caches_f_p_keys_values(pack):
    _, _, host = pack
    patch, ib, _ = make_patch(host)
    assert copy.deepcopy(patch) is patch, "ModelPatcher.clone deep-copies model_options; the weights must be shared"
    x = torch.randn(2, 12, 16)
    patch(x, {"transformer_index": 1, "block_index": 0})
    adapters, kv = patch.prepared(x.device, x.dtype)
    patch(x, {"transformer_index": 1, "block_index": 1})
    assert patch.prepared(x.device, x.dtype)[1] is kv and len(patch._prepared) == 1, "f_p K/V computed once"
    assert adapters[1] is ib.adapters[1], "same device and dtype: the loaded adapters are used as they are"


def test_patch_casts_copies_and_never_the_loaded_weights(pack):
    _, _, host = pack
    patch, ib, _ = make_patch(host)
    before = {k: v.clone() for k, v in ib.state_dict().items()}
    assert patch.to(torch.float16) is patch and patch.to(torch.device("cpu")) is patch
    x = torch.randn(2, 12, 16, dtype=torch.bfloat16)
    out = patch(x, {"transformer_index": 1, "block_index": 0})
    assert out.dtype == torch.bfloat16
    adapters, _ = patch.prepared(x.device, torch.bfloat16)
    assert adapters[1].to_q.weight.dtype == torch.bfloat16 and adapters[1] is not ib.adapters[1]
    for k, v in ib.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), f"loaded weight {k} changed"
    patch.to("meta")  # the model moved away: what was prepared on the CPU is dropped
    assert patch._prepared == {}


def test_sigma_window(pack):
    _, _, host = pack
    patch, _, _ = make_patch(host, sigma_range=(10.0, 2.0))
    x = torch.randn(2, 12, 8)
    opts = {"transformer_index": 0, "block_index": 0}
    assert patch(x, {**opts, "sigmas": torch.tensor([14.0, 14.0])}) is x
    assert patch(x, {**opts, "sigmas": torch.tensor([1.0, 1.0])}) is x
    assert patch(x, {**opts, "sigmas": torch.tensor([5.0, 5.0])}) is not x


class Sampling:
    def percent_to_sigma(self, p):
        return 999999999.9 if p <= 0 else 0.0 if p >= 1 else 14.6 * (1 - p)


def test_apply_clones_and_never_touches_the_input_model(pack):
    _, _, host = pack
    unet = comfy_like_unet()
    layout = host.unet_adapter_layout(unet)
    model = FakeModel(unet, 32, Sampling())
    model.model_options["transformer_options"]["patches"] = {"middle_patch": ["someone else's"]}
    before = copy.deepcopy(model.model_options)
    booth = host.BoothModel(InstantBooth(tiny_config(layout)), "t.safetensors")
    concept = host.BoothConcept(Concept(torch.zeros(32), torch.randn(10, 32), "sks", "person", 2), booth)
    m = host.apply(model, concept, 0.3, 0.2, 0.8, skip_levels="1", skip_blocks="0")
    assert model.model_options == before
    patches = m.model_options["transformer_options"]["patches"]["middle_patch"]
    assert patches[0] == "someone else's" and isinstance(patches[1], host.InstantBoothPatch)
    assert patches[1].enabled == [False, False, False, False, False, False, False, False, True, True]
    assert patches[1].sigma_range == pytest.approx((14.6 * 0.8, 14.6 * 0.2))
    plain = host.apply(model, concept, 0.3, 0.5, 0.5)
    assert plain.model_options == before, "an empty range adds no patch: the output stays exact"
    booth.model.config.beta = 0.7
    (_, patch) = host.apply(model, concept, 0.0).model_options["transformer_options"]["patches"]["middle_patch"]
    assert patch.beta == 0.7, "β 0 means the file's β"
    booth.model.config.beta = 0.0
    assert host.apply(model, concept, 0.0).model_options == before, "a file's β of 0 adds no patch"
    with pytest.raises(ValueError, match="skip_blocks: 'x' is not a number"):
        host.apply(model, concept, 0.3, skip_blocks="1, x")
    with pytest.raises(ValueError, match=r"blocks \[12\] do not exist"):
        host.apply(model, concept, 0.3, skip_blocks="12")
    with pytest.raises(ValueError, match="start_percent"):
        host.apply(model, concept, 0.3, 0.9, 0.1)


@pytest.mark.slow  # importing diffusers takes most of it
def test_patch_in_a_diffusers_unet_equals_the_diffusers_host(pack):
    """The ComfyUI patch put where ComfyUI calls middle_patch (self-attention residual done, before cross-attention),
    numbered by (transformer_index, block_index), gives the diffusers host's output: same weights, same result."""
    from tiny_models import tiny_unet

    from boothkit.hosts.diffusers.instantbooth import InstantBoothHooks, adapter_layout, transformer_blocks

    _, _, host = pack
    unet = tiny_unet(depth=2)
    patch, ib, f_p = make_patch(host, gate=0.6, beta=0.4, layout=adapter_layout(unet))
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)

    def run():
        with torch.no_grad():
            return unet(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample

    with InstantBoothHooks(unet, ib, f_p, beta=0.4):
        want = run()
    handles, depth_seen = [], {}
    for block, _, t in transformer_blocks(unet):
        b = depth_seen[t] = depth_seen.get(t, -1) + 1
        state = {}
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, s=state: s.update(x=args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        handles.append(block.attn1.register_forward_hook(
            lambda m, args, out, s=state, t=t, b=b: patch(out + s["x"], {"transformer_index": t, "block_index": b})
            - s["x"]))
    try:
        got = run()
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
    assert not torch.allclose(run(), want, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# the concept token


class FakeClip:
    """ComfyUI CLIP's tokenize contract: {key: [chunk, ...]}, each chunk start + up to 75 tokens + end, padded to 77
    with the end token; tokens are (id, weight) or (id, weight, word_id). Whole words are single tokens here."""

    START, END, LENGTH = 49406, 49407, 77

    def __init__(self, keys=("l",)):
        self.keys, self.vocab = keys, {}

    def _ids(self, word):
        return [self.vocab.setdefault(word, 1000 + len(self.vocab))]

    def tokenize(self, text, return_word_ids=False, **kwargs):
        words = [(t, w + 1) for w, word in enumerate(text.replace(",", " ,").split()) for t in self._ids(word)]
        chunks, cur = [], []
        for t, w in words:
            if len(cur) == self.LENGTH - 2:
                chunks.append(cur)
                cur = []
            cur.append((t, 1.0, w))
        chunks.append(cur)
        out = []
        for c in chunks:
            full = [(self.START, 1.0, 0)] + c + [(self.END, 1.0, 0)]
            full += [(self.END, 1.0, 0)] * (self.LENGTH - len(full))
            out.append(full if return_word_ids else [(t, w) for t, w, _ in full])
        return {k: out for k in self.keys}

    def encode_from_tokens_scheduled(self, tokens):
        n = len(next(iter(tokens.values())))
        g = torch.Generator().manual_seed(n)
        return [[torch.randn(1, self.LENGTH * n, 8, generator=g), {"pooled_output": torch.ones(1, 8)}]]


def booth_concept(host, ctx=8, **config):
    f_c = torch.arange(ctx, dtype=torch.float32) + 1
    booth = host.BoothModel(InstantBooth(tiny_config(LAYOUT, ctx=ctx, class_noun="person", **config)), "test")
    return host.BoothConcept(Concept(f_c, torch.randn(6, ctx), "sks", "person", 1), booth)


def test_condition_replaces_only_the_identifier_rows(pack):
    _, _, host = pack
    clip, concept = FakeClip(), booth_concept(host)
    text = "a photo of sks person"
    cond = torch.randn(1, 77, 8)
    (out,) = host.condition([[cond, {"pooled_output": torch.ones(1, 8)}]], clip, text, concept, 0.4)
    assert host.identifier_rows(clip, text, "sks") == ([4], 77)
    assert torch.equal(out[0][:, 4], 0.4 * concept.concept.f_c[None])
    keep = [i for i in range(77) if i != 4]
    assert torch.equal(out[0][:, keep], cond[:, keep]) and torch.equal(out[1]["pooled_output"], torch.ones(1, 8))
    concept.booth.model.config.alpha = 0.25
    (out,) = host.condition([[cond, {}]], clip, text, concept, 0.0)
    assert torch.equal(out[0][:, 4], 0.25 * concept.concept.f_c[None]), "α 0 means the file's α"


def test_condition_on_prompts_longer_than_one_chunk_and_with_two_encoders(pack):
    _, _, host = pack
    text = " ".join(["word"] * 80) + " a photo of sks person, sks"
    for keys in [("l",), ("g", "l")]:  # SDXL: two tokenizers, one encoded prompt with both side by side
        rows, length = host.identifier_rows(FakeClip(keys), text, "sks")
        # chunk 0: start + 75 words + end; chunk 1 starts with 5 more words, then "a photo of sks"
        assert length == 154 and rows == [77 + 1 + 5 + 3, 77 + 1 + 5 + 6]
    cond = torch.zeros(1, 154, 8)
    (out,) = host.condition([[cond, {}]], FakeClip(), text, booth_concept(host), 1.0)
    assert out[0][0].abs().sum(-1).nonzero().flatten().tolist() == rows


def test_condition_errors_name_the_identifier_and_the_prompt(pack):
    _, _, host = pack
    with pytest.raises(ValueError, match=r"'a photo of a person'.*identifier 'sks'"):
        host.condition([[torch.zeros(1, 77, 8), {}]], FakeClip(), "a photo of a person", booth_concept(host), 0.4)
    with pytest.raises(ValueError, match="154 token rows.*tokenizes to 77"):
        host.condition([[torch.zeros(1, 154, 8), {}]], FakeClip(), "sks person", booth_concept(host), 0.4)
    with pytest.raises(ValueError, match="channels"):
        host.condition([[torch.zeros(1, 77, 4), {}]], FakeClip(), "sks person", booth_concept(host), 0.4)


def test_insert_identifier_and_text_encode(pack):
    _, _, host = pack
    concept = booth_concept(host)
    assert host.with_identifier("a photo of a woman at night", concept) == "a photo of a sks woman at night"
    assert host.with_identifier("sks person", concept) == "sks person"
    with pytest.raises(ValueError, match="class noun"):
        host.with_identifier("a red car", concept)
    # the category and extra nouns the file was trained with mark the subject too
    toy = booth_concept(host, extra={"settings": {"category": "cat", "class_nouns": ["kitten", "robot"]}})
    assert host.with_identifier("a photo of a robot on snow", toy) == "a photo of a sks robot on snow"
    assert host.with_identifier("a photo of a cat", toy) == "a photo of a sks cat"
    (out,) = host.encode_text(FakeClip(), "a photo of a person", concept, 0.5)
    assert torch.equal(out[0][0, 5], 0.5 * concept.concept.f_c)  # "a photo of a sks person": row 5


# ----------------------------------------------------------------------------------------------------------------------
# encoding concept images


class FakeClipVision:
    """ComfyUI CLIP_VISION.encode_image contract: IMAGE [N, H, W, 3] in 0..1 -> image_embeds [N, Dg] and
    last_hidden_state [N, T, Dt]; records what it was given."""

    def __init__(self, tokens=5):
        self.tokens, self.seen = tokens, []

    def encode_image(self, image, crop=True):
        self.seen.append(image.clone())
        feat = image.mean(dim=(1, 2))  # [N, 3]
        return {"image_embeds": feat.repeat(1, 6)[:, :16], "last_hidden_state": feat[:, None].repeat(1, self.tokens, 8)}


def test_encode_concept_crops_to_the_mask_and_fills_the_background(pack):
    _, _, host = pack
    booth = host.BoothModel(InstantBooth(tiny_config(LAYOUT, background=0.5)), "t.safetensors")
    images = torch.rand(2, 40, 60, 3)
    masks = torch.zeros(2, 40, 60)
    masks[0, 5:25, 10:30] = 1
    masks[1, 10:38, 20:58] = 1
    vision = FakeClipVision()
    bc = host.encode_concept(booth, vision, images, masks)
    assert bc.booth is booth and bc.concept.num_images == 2 and bc.concept.f_p.shape == (2 * 5, 32)
    seen = vision.seen[0]
    assert seen.shape == (2, 32, 32, 3), "cropped and resized to the file's image size, channels last"
    assert torch.allclose(seen[0, 0, 0], torch.full((3,), 0.5)), "outside the subject: the background value"
    one = host.encode_concept(booth, FakeClipVision(), images, masks[:1])  # one mask for every image
    assert one.concept.num_images == 2
    with pytest.raises(ValueError, match=r"mask \[1\] is empty"):
        host.encode_concept(booth, FakeClipVision(), images, torch.stack([masks[0], torch.zeros(40, 60)]))
    with pytest.raises(ValueError, match="3 masks for 2 images"):
        host.encode_concept(booth, FakeClipVision(), images, torch.ones(3, 40, 60))
    with pytest.raises(ValueError, match="gives 7 tokens per image.*trained with 5"):
        host.encode_concept(booth, FakeClipVision(tokens=7), images)


# ----------------------------------------------------------------------------------------------------------------------
# the toy world's host parts that need no ComfyUI


def test_toy_subject_photos_are_a_subjects_images_and_masks(pack):
    import boothkit.hosts.comfy.toyworld as toy

    images, masks, noun = toy.subject_photos(1000, 3, seed=0)
    assert images.shape == (3, 32, 32, 3) and masks.shape == (3, 32, 32) and noun in ("cat", "robot")
    assert 0 <= float(images.min()) and float(images.max()) <= 1 and set(masks.unique().tolist()) == {0.0, 1.0}
    again, _, _ = toy.subject_photos(1000, 3, seed=0)
    other, _, _ = toy.subject_photos(1000, 3, seed=1)
    assert torch.equal(images, again) and not torch.equal(images, other)
    with pytest.raises(ValueError, match="no toy-world identity with id 500"):
        toy.subject_photos(500, 1, seed=0)


def test_toy_unet_config_and_files(pack):
    """The toy UNet's diffusers config read as ComfyUI's UNet arguments; the loaders' toy names resolve to the
    shipped, sha-checked files and nothing else."""
    import boothkit.hosts.comfy.toyworld as toy

    dcfg = json.loads((ROOT / "toyworld" / "weights" / "base" / "unet" / "config.json").read_text())
    cfg = toy.unet_config_from_diffusers(dcfg)
    assert cfg["model_channels"] * cfg["channel_mult"][-1] == dcfg["block_out_channels"][-1]
    assert cfg["context_dim"] == dcfg["cross_attention_dim"] and cfg["in_channels"] == 3
    assert len(cfg["transformer_depth_output"]) == len(dcfg["block_out_channels"]) * (dcfg["layers_per_block"] + 1)
    assert toy.toy_file("instantbooth", "toy_instantbooth.safetensors").name == "instantbooth.safetensors"
    assert toy.toy_file("e4t", "toy_e4t.safetensors").name == "e4t.safetensors"
    assert toy.toy_file("e4t", "toy_instantbooth.safetensors") is None
