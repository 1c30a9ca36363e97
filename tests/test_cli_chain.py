"""The command line as a new user runs it on the toy world: export one subject's photos, tune on them, run the
`boothkit generate` command the tune prints, and look at the image (issue #27)."""
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from boothkit.commands.generate import main as generate
from boothkit.commands.toyworld import main as toyworld
from boothkit.commands.tune import main as tune

pytestmark = pytest.mark.usefixtures("one_thread")

SUBJECT = 1000  # the first held-out identity: a cat no trainer has seen


def printed_generate(out: str) -> list[str]:
    """The arguments of the `boothkit generate` command a tune printed."""
    line = next(ln for ln in out.splitlines() if ln.startswith("see it: "))
    words = shlex.split(line[len("see it: "):])
    assert words[:2] == ["boothkit", "generate"], line
    return words[2:]


def read_png(path, scale: int) -> torch.Tensor:
    """A written PNG back as [N, 3, 32, 32] in [0, 1]; its nearest-neighbour enlargement undone exactly."""
    arr = np.asarray(Image.open(path), dtype=np.float32) / 255
    img = torch.from_numpy(arr).permute(2, 0, 1)
    small = img[:, ::scale, ::scale]
    assert torch.equal(torch.nn.functional.interpolate(small[None], scale_factor=scale, mode="nearest")[0], img), \
        "the image is the sample enlarged by whole pixels"
    side = small.shape[-2]
    return torch.stack(small.split(side, dim=-1))


def test_export_tune_e4t_then_the_printed_generate_shows_the_subject(tmp_path, capsys):
    from boothkit.toyworld import domain
    from boothkit.toyworld.scorers import load_scorers

    assert toyworld(["export", "--identity", str(SUBJECT), "--n", "1", "--out", str(tmp_path / "photos")]) == 0
    assert tune(["--method", "e4t", "--image", str(tmp_path / "photos" / "00000.png"), "--class-noun", "cat",
                 "--out", str(tmp_path / "tuned"), "--steps", "5"]) == 0
    command = printed_generate(capsys.readouterr().out)
    assert command[:2] == ["--e4t-concept", str(tmp_path / "tuned" / "sks_e4t.safetensors")]
    extra = ["--num-images", "4", "--steps", "12", "--threads", "1"]
    with pytest.raises(ValueError, match="'boothkit.e4t_concept', not what --lora takes; pass it as --e4t-concept"):
        generate(["--lora", command[1], "--prompt", "a cat"])
    assert generate(command + extra) == 0
    out = command[command.index("--out") + 1]
    tuned = read_png(out, 8)
    assert tuned.shape == (4, 3, 32, 32)
    prompt = command[command.index("--prompt") + 1]
    assert prompt == "a photo of a sks cat on grass at day"
    base_png = tmp_path / "base.png"
    assert generate(["--prompt", prompt.replace("sks ", ""), "--out", str(base_png)] + extra) == 0
    base = read_png(base_png, 8)

    refs = torch.stack([s.image for s in domain.identity_renders(domain.identity_by_id(SUBJECT), 4, 123)])
    scorers = load_scorers()
    ours = scorers.identity_similarity(tuned, refs).mean().item()
    theirs = scorers.identity_similarity(base, refs).mean().item()
    print(f"identity on held-out #{SUBJECT}: E4T-5 concept {ours:.3f}, base {theirs:.3f}")
    # held-out table: E4T-5 0.58, the base 0.06 over 32 subjects; a clear margin, not a coin toss
    assert ours > theirs + 0.2, f"identity with the tuned concept {ours:.3f}, base model {theirs:.3f}"


def test_quicktune_prints_a_generate_command_that_loads_its_files(tmp_path, capsys):
    """The quick-tune's files through its printed command (a few steps: the plumbing, not the quality, which the
    eval table measures)."""
    assert toyworld(["export", "--identity", str(SUBJECT), "--n", "2", "--out", str(tmp_path / "photos")]) == 0
    assert tune(["--images", str(tmp_path / "photos"), "--class-noun", "cat", "--out", str(tmp_path / "tuned"),
                 "--stage1-steps", "2", "--stage2-steps", "2", "--name", "my cat"]) == 0
    command = printed_generate(capsys.readouterr().out)
    assert command[:4] == ["--embedding", str(tmp_path / "tuned" / "my_cat.safetensors"),
                           "--lora", str(tmp_path / "tuned" / "my_cat_lora.safetensors")]
    extra = ["--steps", "4", "--scale", "2"]
    assert generate(command + extra) == 0
    out = command[command.index("--out") + 1]
    with_files = read_png(out, 2)
    assert with_files.shape == (1, 3, 32, 32)
    # the same seed without the LoRA: the LoRA is applied (the embedding alone is another image again)
    generate(command[:2] + command[4:] + extra + ["--out", str(tmp_path / "emb.png")])
    assert not torch.equal(read_png(tmp_path / "emb.png", 2), with_files)
