"""`boothkit average` and backend.instantbooth.average_instantbooth: the mean of several InstantBooth files."""
import hashlib
import json

import pytest
import torch

from boothkit.backend.files import read_safetensors
from boothkit.backend.instantbooth import average_instantbooth, load_instantbooth, save_instantbooth
from boothkit.cli import main as cli

from test_formats import make


def saved(tmp_path, name, seed, **config):
    torch.manual_seed(seed)
    ib = make()
    for k, v in config.items():
        setattr(ib.config, k, v)
    return ib, save_instantbooth(tmp_path / name, ib)


def test_mean_of_weights_and_the_first_files_settings():
    a, b, c = make(), make(), make()
    a.config.extra = {"steps": 7}
    mean = average_instantbooth([a, b, c])
    for k, v in mean.state_dict().items():
        want = (a.state_dict()[k] + b.state_dict()[k] + c.state_dict()[k]) / 3
        assert torch.allclose(v, want, atol=1e-6), k
    assert mean.config.beta == a.config.beta and mean.config.extra == {"steps": 7}
    mean.config.extra["x"] = 1
    assert a.config.extra == {"steps": 7}, "the first model's record is not changed"
    same = average_instantbooth([a, a])
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in same.state_dict().items())


def test_files_of_other_settings_are_refused_by_name():
    a, b = make(), make()
    b.config.beta = 1.5
    with pytest.raises(ValueError, match=r"model 1 differs from model 0 in 'beta' \(1.5 against 0.3\)"):
        average_instantbooth([a, b])
    with pytest.raises(ValueError, match="at least two"):
        average_instantbooth([a])
    c = make(family="sd2", ctx=1024)
    with pytest.raises(ValueError, match="'family'"):
        average_instantbooth([a, c])


def test_command_writes_the_mean_and_names_its_inputs(tmp_path, capsys):
    a, pa = saved(tmp_path, "a.safetensors", 0)
    b, pb = saved(tmp_path, "b.safetensors", 1)
    out = tmp_path / "soup.safetensors"
    assert cli(["average", str(pa), str(pb), "--output", str(out)]) == 0
    assert "the mean of 2" in capsys.readouterr().out
    back = load_instantbooth(out)
    for k, v in back.state_dict().items():
        assert torch.allclose(v, (a.state_dict()[k] + b.state_dict()[k]) / 2, atol=1e-6), k
    record = json.loads(read_safetensors(out)[1]["training"])
    assert record["averaged_from"] == [
        {"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in (pa, pb)]
    assert record["steps"] == 2, "the first file's training record is kept"
    # an existing output is refused before any work, and kept
    before = out.read_bytes()
    assert cli(["average", str(pa), str(pb), "--output", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert cli(["average", str(pb), str(pa), "--output", str(out), "--overwrite"]) == 0


def test_command_refuses_bad_input(tmp_path, capsys):
    _, pa = saved(tmp_path, "a.safetensors", 0)
    _, pb = saved(tmp_path, "b.safetensors", 1, beta=2.0)
    out = tmp_path / "soup.safetensors"
    with pytest.raises(SystemExit) as e:
        cli(["average", str(pa), "--output", str(out)])
    assert e.value.code == 2 and "two or more files, got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["average", str(pa), str(pa), "--output", str(out)])
    assert "named twice" in capsys.readouterr().err
    assert cli(["average", str(pa), str(pb), "--output", str(out)]) == 2
    assert "differs from model 0 in 'beta'" in capsys.readouterr().err and not out.exists()
    assert cli(["average", str(pa), str(tmp_path / "missing.safetensors"), "--output", str(out)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err and not out.exists()
