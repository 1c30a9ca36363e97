import json

import pytest
import torch

from boothkit.backend import files as formats
from boothkit.backend import instantbooth
from boothkit.backend.files import FormatError, read_safetensors
from boothkit.backend.instantbooth import load_instantbooth, save_instantbooth
from boothkit.backend.instantbooth import AdapterLayout, InstantBooth, InstantBoothConfig


def make(family="sd1", ctx=768):
    lay = AdapterLayout(dims=[16, 32], heads=[2, 4], levels=[0, 1], depths=[1, 1])
    cfg = InstantBoothConfig(vision_global_dim=12, vision_token_dim=10, tokens_per_image=5, ctx_dim=ctx, layout=lay,
                             family=family, identifier="sks", class_noun="cat", alpha=0.4, beta=0.3,
                             extra={"lr_heads": 1e-4, "steps": 2})
    ib = InstantBooth(cfg)
    with torch.no_grad():
        for p in ib.parameters():
            p.normal_()
    return ib


def test_round_trip_tensors_and_metadata(tmp_path):
    ib = make()
    path = save_instantbooth(tmp_path / "ib.safetensors", ib)
    back = load_instantbooth(path, family="sd1", ctx_dim=768)
    for k, v in ib.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    c = back.config
    assert (c.identifier, c.class_noun, c.alpha, c.beta, c.family) == ("sks", "cat", 0.4, 0.3, "sd1")
    assert c.layout == ib.config.layout and c.extra == {"lr_heads": 1e-4, "steps": 2}
    _, meta = read_safetensors(path)
    assert meta["format"] == "boothkit.instantbooth" and meta["version"] == "1" and meta["method"] == "instantbooth"
    assert not list(tmp_path.glob(".*tmp")), "atomic write leaves no temp file"


def rewrite(tmp_path, **changes):
    ib = make()
    tensors = ib.state_dict()
    meta = instantbooth.instantbooth_metadata(ib.config)
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    return formats.write_safetensors(tmp_path / "bad.safetensors", tensors, meta)


@pytest.mark.parametrize("field,value,message", [
    ("format", "boothkit.lora", "field 'format' is 'boothkit.lora', expected 'boothkit.instantbooth'"),
    ("version", "7", "field 'version' is 7, expected <= 1"),
    ("version", "one", "field 'version' is 'one', expected an integer"),
    ("family", "sd3", "field 'family' is 'sd3', expected one of"),
    ("family", None, "field 'family' is None, expected to be present"),
    ("ctx_dim", "-4", "field 'ctx_dim' is '-4', expected a positive integer"),
    ("alpha", "strong", "field 'alpha' is 'strong', expected a number"),
    ("layout", "{not json", "field 'layout' is '{not json', expected JSON"),
    ("layout", json.dumps({"dims": [16]}), "field 'layout'"),
    ("method", "e4t", "field 'method' is 'e4t', expected one of ['instantbooth']"),
    ("ctx_dim", "1024", "inconsistent metadata: family sd1 has text width 768"),
    ("training", "[", "field 'training' is '[', expected JSON"),
    ("adapters_on_uncond", "maybe", "field 'adapters_on_uncond' is 'maybe', expected true or false"),
    ("pixel_features", "1", "field 'pixel_features' is '1', expected true or false"),
    ("start_percent", "late", "field 'start_percent' is 'late', expected a number"),
    ("start_percent", "1.5", "inconsistent metadata: start_percent is 1.5; expected a share of sampling in [0, 1)"),
])
def test_every_metadata_error_names_file_field_found_expected(tmp_path, field, value, message):
    path = rewrite(tmp_path, **{field: value})
    with pytest.raises(FormatError) as e:
        load_instantbooth(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_family_and_width_of_the_target_model_are_checked(tmp_path):
    path = save_instantbooth(tmp_path / "ib.safetensors", make())
    with pytest.raises(FormatError, match="trained for base family 'sd1', but the model to patch is 'sdxl'"):
        load_instantbooth(path, family="sdxl")
    with pytest.raises(FormatError, match="'ctx_dim' is 768, but the model's text encoder is 1024 wide"):
        load_instantbooth(path, ctx_dim=1024)


def test_tensor_mismatches(tmp_path):
    ib = make()
    meta = instantbooth.instantbooth_metadata(ib.config)
    sd = ib.state_dict()
    missing = dict(sd)
    missing.pop("adapters.1.gate")
    p = formats.write_safetensors(tmp_path / "m.safetensors", missing, meta)
    with pytest.raises(FormatError, match=r"missing \['adapters.1.gate'\]"):
        load_instantbooth(p)
    wrong = dict(sd)
    wrong["adapters.0.proj.weight"] = torch.zeros(3, 3)
    p = formats.write_safetensors(tmp_path / "w.safetensors", wrong, meta)
    with pytest.raises(FormatError, match=r"'adapters.0.proj.weight' has shape \(3, 3\)"):
        load_instantbooth(p)


def test_not_safetensors_and_garbage(tmp_path):
    pt = tmp_path / "x.pt"
    pt.write_bytes(b"\x80\x04junk")
    with pytest.raises(FormatError, match="only .safetensors"):
        load_instantbooth(pt)
    junk = tmp_path / "x.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        load_instantbooth(junk)
    with pytest.raises(FileNotFoundError):
        load_instantbooth(tmp_path / "nope.safetensors")


def test_start_percent_round_trips_and_old_files_start_at_the_first_step(tmp_path):
    ib = make()
    ib.config.start_percent = 0.2
    assert load_instantbooth(save_instantbooth(tmp_path / "s.safetensors", ib)).config.start_percent == 0.2
    assert load_instantbooth(rewrite(tmp_path, start_percent=None)).config.start_percent == 0.0


def test_pixel_features_round_trip_and_old_files_have_none(tmp_path):
    lay = AdapterLayout(dims=[16, 32], heads=[2, 4], levels=[0, 1], depths=[1, 1])
    cfg = InstantBoothConfig(vision_global_dim=12, vision_token_dim=10, tokens_per_image=5, ctx_dim=768, layout=lay,
                             image_size=8, pixel_features=True)
    ib = InstantBooth(cfg)
    with torch.no_grad():
        ib.pixel_encoder.fc.weight.normal_()
    back = load_instantbooth(save_instantbooth(tmp_path / "px.safetensors", ib))
    assert back.config.pixel_features and torch.equal(back.pixel_encoder.fc.weight, ib.pixel_encoder.fc.weight)
    path = rewrite(tmp_path, pixel_features=None)  # a file written before the field
    assert load_instantbooth(path).pixel_encoder is None
    tensors, meta = read_safetensors(tmp_path / "px.safetensors")
    meta["pixel_features"] = "false"
    with pytest.raises(FormatError, match="pixel_encoder"):
        load_instantbooth(formats.write_safetensors(tmp_path / "lies.safetensors", tensors, meta))
