"""BoothKit's ComfyUI nodes (V3 schema). ComfyUI imports this through the pack's ``comfy_entrypoint``; only ComfyUI's
own light modules are imported here, the backend is imported when a node runs."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

# safetensors only: BoothKit never reads pickles
MODEL_FOLDERS = {"instantbooth": {".safetensors"}, "e4t": {".safetensors"}}


def register_model_folders() -> None:
    """models/<name> for each BoothKit file type, keeping any paths extra_model_paths.yaml already gave it."""
    for name, extensions in MODEL_FOLDERS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(extensions))


register_model_folders()


def node_list() -> list[type[io.ComfyNode]]:
    from .e4t import NODES as e4t_nodes
    from .instantbooth import NODES as instantbooth_nodes
    from .quicktune import NODES as quicktune_nodes

    return list(instantbooth_nodes) + list(quicktune_nodes) + list(e4t_nodes)


class BoothKitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
