"""The real-browser tier (pytest -m browser; also selected by -m comfyui): ComfyUI started with the pack under a
hyphenated folder name (custom_nodes/ComfyUI-BoothKit), its real frontend opened in headless Chromium, every template
loaded as a user loads it (listed by /workflow_templates, fetched from the pack's template route, app.loadGraphData),
then: no missing node types, no dialog (missing nodes / models), every widget shows the file's value; the toy
templates are queued from the app (app.queuePrompt) and each gives an image. Screenshots and the driver's result go
to $BOOTHKIT_BROWSER_OUT (default: pytest's tmp).

Needs COMFYUI_PATH (a ComfyUI checkout with its python, as the real-ComfyUI tier), node, and the npm packages
@sparticuz/chromium and puppeteer-core: from $BOOTHKIT_BROWSER_DIR, else ~/.cache/boothkit/browser, installed there
with npm when missing (no download beyond the npm registry: @sparticuz/chromium carries its Chromium). Skipped, with
the reason, when any of these is missing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from comfy_server import PACK_FOLDER, base_directory, running

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEMPLATES = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
TOY = [name for name in TEMPLATES if "toy" in name]
PACKAGES = ("@sparticuz/chromium", "puppeteer-core")


def browser_dir() -> Path:
    """A folder whose node_modules hold the browser packages; installed with npm (outside the repository) if needed."""
    folder = Path(os.environ.get("BOOTHKIT_BROWSER_DIR") or Path.home() / ".cache" / "boothkit" / "browser")
    if all((folder / "node_modules" / p / "package.json").is_file() for p in PACKAGES):
        return folder
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"no browser: {folder} has no node_modules with {' and '.join(PACKAGES)}, and npm is not "
                    f"installed to get them (set BOOTHKIT_BROWSER_DIR)")
    folder.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([npm, "install", "--prefix", str(folder), "--no-audit", "--no-fund", *PACKAGES],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        pytest.skip(f"no browser: `npm install {' '.join(PACKAGES)}` into {folder} failed: {out.stderr[-500:]}")
    return folder


@pytest.fixture(scope="module")
def browser_run(tmp_path_factory):
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: the browser tier runs ComfyUI's real frontend (docs/tests.md)")
    node = shutil.which("node")
    if node is None:
        pytest.skip("no browser: node (Node.js) is not installed")
    modules = browser_dir() / "node_modules"
    from boothkit.bench.comfy_overhead import comfyui_python

    comfy = {"path": Path(path).resolve(), "python": comfyui_python(Path(path).resolve())}
    # the driver runs beside a link to the packages, so its imports resolve without touching the repository
    work = tmp_path_factory.mktemp("browser")
    shutil.copy(HERE / "driver.mjs", work / "driver.mjs")
    (work / "node_modules").symlink_to(modules, target_is_directory=True)
    out = Path(os.environ.get("BOOTHKIT_BROWSER_OUT") or tmp_path_factory.mktemp("browser_out"))
    out.mkdir(parents=True, exist_ok=True)
    base = base_directory(tmp_path_factory.mktemp("comfy_base"), ROOT)
    with running(comfy, base, work / "comfyui.log") as server:
        run = subprocess.run([node, str(work / "driver.mjs"), server["url"], str(out), PACK_FOLDER, ",".join(TOY),
                              "300"], cwd=work, capture_output=True, text=True, timeout=1800)
        log = server["log"].read_text()
    if run.returncode != 0:
        pytest.fail(f"the browser driver failed (exit {run.returncode}):\n{run.stderr[-3000:]}\n{run.stdout[-1000:]}")
    result = json.loads((out / "result.json").read_text())
    result["server_log"] = log
    result["out"] = out
    return result


def test_the_template_browser_lists_each_template_once(browser_run):
    listed = browser_run["listed"][PACK_FOLDER]
    assert sorted(listed) == TEMPLATES and len(set(listed)) == len(listed), listed
    assert "IMPORT FAILED" not in browser_run["server_log"], browser_run["server_log"][-3000:]


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_loads_in_the_frontend_with_the_files_values(browser_run, name):
    r = browser_run["templates"][name]
    assert r["missing_types"] == [], f"{name}: node types the frontend does not know: {r['missing_types']}"
    assert r["dialogs"] == [], f"{name}: dialogs on load: {r['dialogs']}"
    assert r["widget_diffs"] == [], f"{name}: widgets that do not show the file's value: {r['widget_diffs']}"
    assert (browser_run["out"] / f"{name}.png").stat().st_size > 10_000, "screenshot"


@pytest.mark.parametrize("name", TOY)
def test_toy_template_queued_from_the_frontend_gives_an_image(browser_run, name):
    r = browser_run["templates"][name]
    assert r["status"] == "success", f"{name}: {r['status']}: {json.dumps(r['messages'])[:2000]}"
    expected = 3 if name == "toy_compare" else 1  # the comparison saves the three methods' images together
    assert len(r["images"]) == expected and all(i["type"] == "output" for i in r["images"]), r["images"]
