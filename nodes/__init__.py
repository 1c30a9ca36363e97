"""BoothKit's ComfyUI nodes (V3 schema). ComfyUI imports this through the pack's ``comfy_entrypoint``; only ComfyUI's
own light modules are imported here, the backend is imported when a node runs."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

# safetensors only: BoothKit never reads pickles
MODEL_FOLDERS = {"instantbooth": {".safetensors"}}


def register_model_folders() -> None:
    """models/<name> for each BoothKit file type, keeping any paths extra_model_paths.yaml already gave it."""
    for name, extensions in MODEL_FOLDERS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(extensions))


register_model_folders()


def node_list() -> list[type[io.ComfyNode]]:
    from .instantbooth import NODES as instantbooth_nodes

    nodes = list(instantbooth_nodes)
    try:
        from .quicktune import NODES as quicktune_nodes
    except ModuleNotFoundError as e:  # the quick-tune nodes are optional until nodes/quicktune.py exists
        if e.name != f"{__name__}.quicktune":
            raise
    else:
        nodes += quicktune_nodes
    return nodes


class BoothKitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
