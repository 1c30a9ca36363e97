"""Stand-ins for the ComfyUI modules the nodes import (``comfy_api.latest``, ``folder_paths``), so node schemas and the
ComfyUI host code are tested without ComfyUI (as ComfyUI's own tests-unit stub ``nodes``/``server``). They keep only
what the pack uses of the real V3 API (comfy_api/latest/_io.py at ComfyUI a125cd8); the real-ComfyUI tier checks the
same nodes against the real thing."""
from __future__ import annotations

import os
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass


class _Input:
    Parent = None

    def __init__(self, id, display_name=None, optional=False, tooltip=None, **kwargs):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.options = kwargs.pop("options", None)
        self.kwargs = kwargs

    @property
    def io_type(self):
        return self.Parent.io_type

    @property
    def is_widget(self) -> bool:
        return self.Parent.widget and not self.kwargs.get("force_input")


class _ComboInput(_Input):
    def __init__(self, id, options=None, **kwargs):
        super().__init__(id, options=options, **kwargs)


class _Output:
    Parent = None

    def __init__(self, id=None, display_name=None, tooltip=None, **kwargs):
        self.id, self.display_name, self.tooltip, self.kwargs = id, display_name, tooltip, kwargs

    @property
    def io_type(self):
        return self.Parent.io_type


def _comfytype(io_type: str, widget: bool = False, input_base=_Input):
    t = type(io_type, (), {"io_type": io_type, "widget": widget})
    t.Input = type("Input", (input_base,), {"Parent": t})
    t.Output = type("Output", (_Output,), {"Parent": t})
    return t


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = None
    outputs: list = None
    hidden: list = None
    description: str = ""
    is_output_node: bool = False


class ComfyNode:
    @classmethod
    def define_schema(cls):
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError


class NodeOutput:
    def __init__(self, *args, ui=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None


class ComfyExtension:
    async def get_node_list(self):
        raise NotImplementedError


def make_io() -> types.SimpleNamespace:
    io = types.SimpleNamespace(Schema=Schema, ComfyNode=ComfyNode, NodeOutput=NodeOutput,
                               Custom=lambda io_type: _comfytype(io_type))
    for name, io_type in [("Model", "MODEL"), ("Clip", "CLIP"), ("ClipVision", "CLIP_VISION"),
                          ("Conditioning", "CONDITIONING"), ("Image", "IMAGE"), ("Mask", "MASK"),
                          ("Latent", "LATENT"), ("Vae", "VAE"), ("LoraModel", "LORA_MODEL"),
                          ("Hooks", "HOOKS")]:
        setattr(io, name, _comfytype(io_type))
    for name, io_type in [("Int", "INT"), ("Float", "FLOAT"), ("String", "STRING"), ("Boolean", "BOOLEAN")]:
        setattr(io, name, _comfytype(io_type, widget=True))
    io.Combo = _comfytype("COMBO", widget=True, input_base=_ComboInput)
    return io


def make_folder_paths(models_dir: str) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.models_dir = models_dir
    fp.folder_names_and_paths = {}

    def add_model_folder_path(name, path, is_default=False):
        if name in fp.folder_names_and_paths:
            paths = fp.folder_names_and_paths[name][0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)
        else:
            fp.folder_names_and_paths[name] = ([path], set())

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths[name][0])

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        out = []
        for p in paths:
            if os.path.isdir(p):
                out += [f for f in os.listdir(p) if not exts or os.path.splitext(f)[1].lower() in exts]
        return sorted(out)

    def get_full_path(name, filename):
        for p in fp.folder_names_and_paths[name][0]:
            full = os.path.join(p, filename)
            if os.path.isfile(full):
                return full
        return None

    def get_full_path_or_raise(name, filename):
        full = get_full_path(name, filename)
        if full is None:
            raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
        return full

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_full_path_or_raise = get_full_path_or_raise
    return fp


def stub_modules(models_dir: str) -> dict[str, types.ModuleType]:
    """sys.modules entries to install: comfy_api, comfy_api.latest (io, ComfyExtension), folder_paths."""
    latest = types.ModuleType("comfy_api.latest")
    latest.io = make_io()
    latest.ComfyExtension = ComfyExtension
    api = types.ModuleType("comfy_api")
    api.latest = latest
    return {"comfy_api": api, "comfy_api.latest": latest, "folder_paths": make_folder_paths(models_dir)}


@contextmanager
def stubbed_comfy(models_dir, folders=()):
    """While inside, ComfyUI's modules are these stubs (with model ``folders`` registered under ``models_dir``) and
    ``boothkit.nodes`` is imported afresh against them; both are undone on exit, so nothing leaks into other tests."""
    import pytest

    mp = pytest.MonkeyPatch()
    stubs = stub_modules(str(models_dir))
    for name in folders:
        stubs["folder_paths"].add_model_folder_path(name, os.path.join(str(models_dir), name))
    for name, module in stubs.items():
        mp.setitem(sys.modules, name, module)
    for name in [m for m in sys.modules if m.startswith(("boothkit.nodes", "boothkit.hosts.comfy"))]:
        mp.delitem(sys.modules, name)
    try:
        yield
    finally:
        for name in [m for m in sys.modules if m.startswith(("boothkit.nodes", "boothkit.hosts.comfy"))]:
            del sys.modules[name]
        mp.undo()
