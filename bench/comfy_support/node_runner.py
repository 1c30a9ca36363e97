"""What the real-tier drivers (and `boothkit bench comfy-memory`) share, in ComfyUI's python: call a node as ComfyUI's
executor does, catch the message a node error shows in the UI, and collect the warnings ComfyUI logs (e.g. "lora key
not loaded")."""
from __future__ import annotations

import logging
from contextlib import contextmanager


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def node_runner():
    """``run(node_id, **inputs)``: the node called as ComfyUI's executor calls it, inside torch.inference_mode()
    (execution.py), so loaded weights are inference tensors as in a real run."""
    import nodes
    import torch
    from comfy_api.internal import _ComfyNodeInternal, make_locked_method_func

    def run(node_id, **kwargs):
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        with torch.inference_mode():
            if issubclass(cls, _ComfyNodeInternal):
                return make_locked_method_func(cls, cls.FUNCTION, cls.PREPARE_CLASS_CLONE({}))(**kwargs).result
            return getattr(cls(), cls.FUNCTION)(**kwargs)
    return run


def stock_lora_loader(run, model, clip, lora_name: str):
    """Stock LoraLoader at strength 1 on ``lora_name``: (MODEL, CLIP, the warnings ComfyUI logged meanwhile, such as
    "lora key not loaded")."""
    records = Records()
    logging.getLogger().addHandler(records)
    try:
        lora_model, lora_clip = run("LoraLoader", model=model, clip=clip, lora_name=lora_name, strength_model=1.0,
                                    strength_clip=1.0)
    finally:
        logging.getLogger().removeHandler(records)
    return lora_model, lora_clip, records.messages


@contextmanager
def saved_for_backward():
    """Counts, while inside, the bytes autograd saves for backward passes: ``with saved_for_backward() as n: ...``,
    then ``n[0]``. Inside a gradient-checkpointed layer checkpointing's own hooks take over, so what such a layer
    would have saved is not counted: the count is what checkpointing leaves held between forward and backward."""
    import torch

    count = [0]

    def pack(t):
        count[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield count


def instance_forwards(root) -> int:
    """How many modules under ``root`` have a forward set on the instance (a patch not taken off)."""
    return sum("forward" in m.__dict__ for m in root.modules())


def error_of(fn):
    """The message a node error shows in the UI, or None."""
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def start(argv, name: str):
    """What every tuning driver does first: parse the common arguments (--comfyui, --pack, --models, --work, --out),
    set up ComfyUI on the CPU with one thread, load the pack with ComfyUI's own loader. Returns (args, the pack's
    module name, whether it loaded, log(stage))."""
    import asyncio
    import os
    import sys
    import time

    p = driver_parser()
    p.add_argument("--work", required=True, help="dir for the models/ folders the driver writes")
    a = p.parse_args(argv)
    from make_models import setup_comfy

    setup_comfy(a.comfyui, pytorch_attention=True)
    import torch

    torch.set_num_threads(1)
    import nodes

    t0 = time.perf_counter()

    def log(stage):
        print(f"[{name} driver {time.perf_counter() - t0:6.1f}s] {stage}", file=sys.stderr, flush=True)
    log.elapsed = lambda: time.perf_counter() - t0

    loaded = bool(asyncio.run(nodes.load_custom_node(a.pack)))
    return a, os.path.abspath(a.pack).replace(".", "_x_"), loaded, log  # the module name load_custom_node gives


def pack_modules(pack: str, *names: str) -> list:
    """The pack's modules ``names`` (e.g. "nodes.e4t_host"), as ComfyUI's loader imported it under ``pack``."""
    import importlib

    return [importlib.import_module(f"{pack}.{name}") for name in names]


def add_model_folders(models: str, names=("checkpoints", "clip_vision")) -> None:
    """Let ComfyUI's loaders find the test models: ``models``/<name> added to each of ComfyUI's folders ``names``."""
    import os

    import folder_paths

    for name in names:
        folder_paths.add_model_folder_path(name, os.path.join(models, name))


def work_folders(work: str, names) -> dict:
    """Point ComfyUI's model folders ``names`` at fresh folders under ``work`` (never the checkout's models/);
    returns name -> path."""
    import os

    import folder_paths

    paths = {}
    for name in names:
        paths[name] = os.path.join(work, name)
        os.makedirs(paths[name], exist_ok=True)
        folder_paths.folder_names_and_paths[name] = ([paths[name]], folder_paths.folder_names_and_paths[name][1])
    return paths


def write_results(out: str, results: dict, tensors: dict) -> None:
    """What a driver hands back to its test: OUT/results.json and OUT/tensors.safetensors (float32)."""
    import json
    import os

    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(out, "tensors.safetensors"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


def unet_state(model) -> dict:
    """The MODEL's UNet weights as sampling would see them (its patches applied), copied."""
    import comfy.model_management as mm
    import torch

    with torch.inference_mode():
        mm.load_models_gpu([model])
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def token_table(clip, layer):
    """The CLIP's token-embedding table ``layer`` as encoding would see it (its patches applied), copied."""
    import torch

    with torch.inference_mode():
        clip.load_model()
    return layer.weight.detach().clone()


def driver_parser():
    """The arguments every driver takes: --comfyui, --pack (the pack as ComfyUI sees it), --models, --out."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--comfyui", required=True)
    p.add_argument("--pack", required=True, help="the pack as ComfyUI sees it: a custom_nodes/<name> path")
    p.add_argument("--models", required=True, help="dir with checkpoints/ and clip_vision/ (make_models.py)")
    p.add_argument("--out", required=True)
    return p


def run_main(main) -> None:
    """A driver's entry point: exit with ``main()``'s code; on an error print the traceback (the test shows the
    driver's stderr) and exit 1."""
    import sys
    import traceback

    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
