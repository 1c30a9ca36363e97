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
