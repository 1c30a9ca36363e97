import subprocess
import sys


def test_importing_the_pack_is_light():
    """ComfyUI imports the pack at start-up: no diffusers, transformers, accelerate or kornia until a node runs."""
    code = ("import sys, boothkit, boothkit.backend; "
            "heavy = [m for m in ('diffusers', 'transformers', 'accelerate', 'kornia') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_lists_commands_and_rejects_unknown(capsys):
    from boothkit.cli import main

    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path, capsys):
    from boothkit.cli import main

    assert main(["generate", "--images", str(tmp_path / "missing.png"), "--prompt", "a cat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("boothkit generate: error:") and not any("Traceback" in line for line in err)


def test_cli_help_lines_agree_with_the_commands(capsys):
    """`boothkit --help` names what each command has: every bench, every toyworld subcommand, E4T under tune; and
    each command's own --help lists what it takes."""
    import pytest

    from boothkit.cli import COMMANDS
    from boothkit.commands import bench, generate, toyworld

    def help_of(parse_args) -> str:
        with pytest.raises(SystemExit):
            parse_args(["--help"])
        return capsys.readouterr().out

    for name in bench.BENCHES:
        assert name in COMMANDS["bench"][1] or (name.startswith("comfy-") and "comfy-*" in COMMANDS["bench"][1]), name
    text = help_of(toyworld.parse_args)
    for command, words in (("export", "export"), ("identities", "identities"), ("verify", "verify")):
        assert command in text and words in COMMANDS["toyworld"][1], command
    assert "--method e4t" in COMMANDS["tune"][1] and "E4T" in COMMANDS["demo"][1]
    text = help_of(generate.parse_args)
    for option in ("--images", "--embedding", "--lora", "--e4t-concept", "--scale", "--threads"):
        assert option in text, option
