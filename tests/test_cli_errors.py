"""`boothkit` subcommands fail with one line `boothkit CMD: error: ...` (exit 2) naming what is wrong, and Ctrl-C
stops `boothkit tune` after the current step with nothing written (exit 130)."""
import json
import os
import signal

import pytest
from test_quicktune import write_images
from tiny_models import tiny_sd_folder

from boothkit.cli import main as cli


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"boothkit {command}: error: "), err
    return err[0]


def test_train_errors_name_the_file_and_the_key(tmp_path, capsys):
    missing = tmp_path / "none.toml"
    assert cli(["train", "instantbooth", "--config", str(missing)]) == 2
    assert f"config file {missing} not found" in one_error_line(capsys, "train")
    bad = tmp_path / "bad.toml"
    bad.write_text("[modle]\nbase = 'x'\n")
    assert cli(["train", "e4t", "--config", str(bad)]) == 2
    assert "unknown section(s) ['modle']" in one_error_line(capsys, "train")
    nobase = tmp_path / "nobase.toml"
    nobase.write_text("[data]\ntrain = 'x'\n")
    assert cli(["train", "e4t", "--config", str(nobase)]) == 2
    assert "the config needs [model] base" in one_error_line(capsys, "train")
    with pytest.raises(SystemExit) as e:  # argparse: usage and the choices
        cli(["train", "dreambooth", "--config", str(bad)])
    assert e.value.code == 2 and "invalid choice: 'dreambooth'" in capsys.readouterr().err


def test_eval_errors(capsys, tmp_path):
    assert cli(["eval", "--methods", "nosuch", "--subjects", "1", "--out", str(tmp_path)]) == 2
    line = one_error_line(capsys, "eval")
    assert "unknown method(s) ['nosuch']" in line and "instantbooth" in line, "lists what is available"
    assert not (tmp_path / "eval.json").exists()


def test_toyworld_verify_reports_a_file_the_manifest_does_not_list(capsys, tmp_path, monkeypatch):
    from boothkit.toyworld import store

    assert cli(["toyworld", "verify"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"files match {store.MANIFEST}")
    listed = tmp_path / "MANIFEST.json"
    listed.write_text(json.dumps({"base/nosuch.safetensors": {"sha256": "0" * 64}}))
    monkeypatch.setattr(store, "MANIFEST", listed)  # verify lists this one; the shipped manifest lacks the name
    assert cli(["toyworld", "verify"]) == 2
    assert "nosuch.safetensors: not listed in" in one_error_line(capsys, "toyworld")


def test_tune_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["tune", "--method", "e4t", "--class-noun", "cat", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--method e4t needs --image FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli(["tune", "--images", str(tmp_path), "--class-noun", "cat", "--out", str(tmp_path),
             "--stage2-steps", "-1"])
    assert e.value.code == 2 and "argument --stage2-steps: -1 is out of range" in capsys.readouterr().err
    imgs = write_images(tmp_path / "imgs")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sks.safetensors").write_bytes(b"mine")
    assert cli(["tune", "--images", str(imgs), "--class-noun", "cat", "--out", str(out), "--model", "toy"]) == 2
    assert "sks.safetensors" in one_error_line(capsys, "tune") and (out / "sks.safetensors").read_bytes() == b"mine"


def test_ctrl_c_stops_tune_after_the_current_step_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """A real SIGINT to this process while `boothkit tune` trains (sent from the progress callback of the first step,
    so it never races the start): the handler `boothkit tune` installs asks the loop to stop, the step in hand
    finishes, nothing is written, exit 130 and the line that says so; the previous handler is back afterwards."""
    from boothkit.commands import tune

    sd = tiny_sd_folder(tmp_path / "sd")
    imgs = write_images(tmp_path / "imgs")
    out, steps = tmp_path / "out", []
    real = tune.Cancellable.on_progress

    def first_step_then_ctrl_c(self, done, n, loss):
        real(self, done, n, loss)
        steps.append(done)
        if len(steps) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(tune.Cancellable, "on_progress", first_step_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    argv = ["tune", "--images", str(imgs), "--class-noun", "cat", "--out", str(out), "--model", str(sd),
            "--stage1-steps", "30", "--stage2-steps", "10", "--batch-size", "1", "--init-word", "dog"]
    assert cli(argv) == 130
    assert steps == [1], "stopped after the step in hand"
    assert "quick-tune cancelled; nothing written" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    assert signal.getsignal(signal.SIGINT) is before
