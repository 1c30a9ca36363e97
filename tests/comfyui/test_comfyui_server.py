"""A real ComfyUI server (main.py --cpu on 127.0.0.1, everything under a temporary --base-directory): /object_info
lists every BoothKit node, each workflow in workflows/ converted to API form (with the test's model names and a small
size substituted) runs through /prompt, and /history + /view give back an image. A node error reaches the client as
a message."""
from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import uuid
from pathlib import Path

import pytest
from comfy_server import PACK_FOLDER, http, running

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                 reason="COMFYUI_PATH is not set: the real-ComfyUI tier needs a ComfyUI checkout "
                                        "(docs/tests.md)")]

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # nodes the frontend draws and never sends
# what a user substitutes: their model names (here the test's), plus a small size and 2 steps to stay fast on a CPU
SUBSTITUTE = {"ckpt_name": "boothkit_tiny_sd15.safetensors", "clip_name": "boothkit_vitl14.safetensors",
              "instantbooth_name": "ib_random.safetensors", "e4t_name": "e4t_random.safetensors",
              "image": "subject.png", "width": 128, "height": 128, "steps": 2, "embedding_steps": 1, "denoiser_steps": 1, "resolution": 64}
# per BoothKit node of a workflow: an input, a bad value for it, and the start of the message the client must get
BAD_INPUT = {"BoothKitInstantBoothCondition": ("text", "a photo of a person", "does not contain the identifier 'sks'"),
             "BoothKitQuickTuneConcept": ("identifier", "qzxvbkw", "identifier 'qzxvbkw' is"),
             "BoothKitE4TTune": ("class_noun", "orange cat", "class noun 'orange cat' is")}


@pytest.fixture(scope="module")
def server(comfy, comfy_base, driver_run, e4t_run, tmp_path_factory):
    """ComfyUI's main.py in its own python; the pack comes in through custom_nodes/ComfyUI-BoothKit of the base
    directory."""
    from PIL import Image

    Image.new("RGB", (160, 200), (180, 120, 90)).save(comfy_base / "input" / "subject.png")
    with running(comfy, comfy_base, tmp_path_factory.mktemp("server") / "comfyui.log") as server:
        yield server


def is_widget(spec) -> bool:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) \
        and not options.get("forceInput")


def has_control(name: str, spec) -> bool:
    """The frontend's rule (useIntWidget): an INT widget is followed by a 'control after generate' value when its
    spec says control_after_generate, or, when the spec does not say, when it is named seed or noise_seed."""
    options = spec[1] if len(spec) > 1 else {}
    declared = options.get("control_after_generate")
    return spec[0] == "INT" and (declared if declared is not None else name in ("seed", "noise_seed"))


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow -> the API prompt the frontend would send: widget values in the node's input order
    (plus the frontend-only values: a seed's 'control after generate', an image upload combo's button)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in FRONTEND_ONLY:  # muted / bypassed / notes
            continue
        info = object_info[node["type"]]
        linked = {s["name"]: links[s["link"]] for s in node.get("inputs", []) if s.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for section in ("required", "optional"):
            for name in info["input_order"].get(section, []):
                spec = info["input"][section][name]
                if is_widget(spec):
                    assert values, f"node {node['id']} ({node['type']}): no widget value for {name}"
                    inputs[name] = values.pop(0)
                    options = spec[1] if len(spec) > 1 else {}
                    if has_control(name, spec) or options.get("image_upload"):
                        values.pop(0)
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
        assert not values, f"node {node['id']} ({node['type']}): widget values left over: {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def widget_errors(prompt: dict, object_info: dict) -> list[str]:
    """Values that the server's own validation would reject, listed up front (file names are the user's)."""
    errors = []
    for nid, node in prompt.items():
        info = object_info[node["class_type"]]["input"]
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                value = node["inputs"].get(name)
                if value is None or isinstance(value, list) or not is_widget(spec):
                    continue
                options = spec[1] if len(spec) > 1 else {}
                choices = spec[0] if isinstance(spec[0], list) else options.get("options")
                if choices is not None and not name.endswith("_name") and name != "image" and value not in choices:
                    errors.append(f"{nid}.{name}={value!r} not in {choices[:10]}")
                if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
                    errors.append(f"{nid}.{name}={value!r} outside [{options.get('min')}, {options.get('max')}]")
    return errors


def submit(server, prompt: dict, timeout: float = 900) -> dict:
    try:
        queued = http(server["url"] + "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
    except urllib.error.HTTPError as e:
        pytest.fail(f"/prompt rejected the workflow: {e.read().decode()[:3000]}")
    pid = queued["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = http(server["url"] + f"/history/{pid}")
        if pid in history and history[pid].get("status", {}).get("completed") is not None:
            status = history[pid]["status"]
            if status.get("status_str") in ("success", "error"):
                return history[pid]
        time.sleep(1)
    pytest.fail(f"prompt {pid} did not finish in {timeout} s; log:\n{server['log'].read_text()[-3000:]}")


def test_object_info_lists_every_boothkit_node(server):
    log = server["log"].read_text()
    assert "IMPORT FAILED" not in log or "boothkit" not in log.split("IMPORT FAILED")[1][:300], log[-3000:]
    ours = {k: v for k, v in server["object_info"].items() if k.startswith("BoothKit")}
    assert set(ours) == {"BoothKitLoadInstantBooth", "BoothKitInstantBoothEncodeConcept", "BoothKitInstantBoothApply",
                         "BoothKitInstantBoothCondition", "BoothKitInstantBoothTextEncode",
                         "BoothKitQuickTuneConcept", "BoothKitSaveConcept", "BoothKitLoadE4T", "BoothKitE4TTune",
                         "BoothKitInstantBoothInsertIdentifier", "BoothKitToyWorldLoader", "BoothKitToySubjectPhotos",
                         "BoothKitLoadE4TConcept", "BoothKitInstantBoothRegion", "BoothKitConceptHook"}
    assert all(v["category"].startswith("BoothKit/") and v["python_module"] == f"custom_nodes.{PACK_FOLDER}"
               for v in ours.values())
    options = ours["BoothKitLoadInstantBooth"]["input"]["required"]["instantbooth_name"][1]["options"]
    assert "ib_random.safetensors" in options and all(o.endswith(".safetensors") for o in options)
    assert options[-1] == "toy_instantbooth.safetensors"
    # each template once (ComfyUI lists a file once per template folder it finds)
    listed = http(server["url"] + "/workflow_templates")
    assert sorted(listed[PACK_FOLDER]) == sorted(p.stem for p in WORKFLOWS), listed


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_and_gives_an_image(server, path):
    from PIL import Image

    workflow = json.loads(path.read_text())
    prompt = ui_to_api(workflow, server["object_info"])
    assert not widget_errors(prompt, server["object_info"])
    toy = "toy" in path.name  # runs as it is: nothing to substitute
    for node in prompt.values():
        for key, value in SUBSTITUTE.items():
            if not toy and key in node["inputs"] and not isinstance(node["inputs"][key], list):
                node["inputs"][key] = value
    entry = submit(server, prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images, "the workflow produced no image"
    img = images[0]
    data = http(server["url"] + f"/view?filename={img['filename']}&subfolder={img['subfolder']}&type={img['type']}")
    with Image.open(io.BytesIO(data)) as im:
        # the toy world is 32x32; its two-subject template 64 wide x 32 high
        assert im.size == (((64, 32) if "two_subjects" in path.name else (32, 32)) if toy else (128, 128))
        if toy:  # a picture, not a blank: the toy world's scenes have sky, ground and a subject
            assert max(im.convert("L").getextrema()) - min(im.convert("L").getextrema()) > 60

    # the same workflow with a bad input (a prompt without the identifier, an identifier of several tokens): the
    # node's message reaches the client
    node = next((n for n in prompt.values() if n["class_type"] in BAD_INPUT), None)
    if node is None or toy:
        return
    name, value, message = BAD_INPUT[node["class_type"]]
    node["inputs"][name] = value
    entry = submit(server, prompt)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == node["class_type"]
    assert message in errors[0]["exception_message"]
