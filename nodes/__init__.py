"""BoothKit's ComfyUI nodes (V3 schema). ComfyUI imports this through the pack's ``comfy_entrypoint``; only ComfyUI's
own light modules are imported here, the backend is imported when a node runs."""
from __future__ import annotations

import importlib
import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

# safetensors only: BoothKit never reads pickles
MODEL_FOLDERS = {"instantbooth": {".safetensors"}, "e4t": {".safetensors"}, "e4t_concepts": {".safetensors"}}

# the node menu: one sub-category per method (ComfyUI shows "BoothKit" with these under it)
CATEGORIES = {"instantbooth": "BoothKit/InstantBooth", "e4t": "BoothKit/E4T", "quicktune": "BoothKit/quick-tune",
              "concepts": "BoothKit/concepts", "toyworld": "BoothKit/toy world"}


def register_model_folders() -> None:
    """models/<name> for each BoothKit file type, keeping any paths extra_model_paths.yaml already gave it. The
    default folder is created (mode from the umask), so a new user sees where the files go."""
    for name, extensions in MODEL_FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, name)
        folder_paths.add_model_folder_path(name, default)
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(extensions))
        try:
            os.makedirs(default, exist_ok=True)
        except OSError:  # a read-only install: the dropdown stays empty and the node's description says why
            pass


register_model_folders()


def host(method: str):
    """The ComfyUI host module of a method (hosts/comfy/<method>.py), imported when a node runs, never at start-up."""
    return importlib.import_module(f"..hosts.comfy.{method}", __package__)


# the toy world's method files, shipped with the pack, listed by the loaders after the user's own files
TOY_FILES = {"instantbooth": "toy_instantbooth.safetensors", "e4t": "toy_e4t.safetensors", "e4t_concepts": None}


def file_options(folder: str) -> list[str]:
    """A loader's dropdown: the files in models/<folder>, then the toy world's file (it runs on the toy world's
    model only: Toy World Loader)."""
    names = list(folder_paths.get_filename_list(folder))
    toy = TOY_FILES[folder]
    return names + [toy] if toy is not None and toy not in names else names


def file_path(folder: str, name: str, required: bool = True) -> str | None:
    """The file behind a dropdown option: the user's in models/<folder>, else the shipped toy file."""
    path = folder_paths.get_full_path(folder, name)
    if path is None and name is not None and name == TOY_FILES[folder]:
        path = str(host("toyworld").toy_file(folder, name))
    if path is None and required:
        raise FileNotFoundError(f"{folder} file '{name}' is not in models/{folder} (searched "
                                f"{', '.join(folder_paths.get_folder_paths(folder))})")
    return path


def check_file(folder: str, name: str, what: str) -> bool | str:
    """A loader's validate_inputs: True, or the message for a file that is neither the user's nor the toy's."""
    if name == TOY_FILES[folder] or folder_paths.get_full_path(folder, name) is not None:
        return True
    searched = ", ".join(folder_paths.get_folder_paths(folder))
    return f"{what} file '{name}' is not in models/{folder} (searched {searched})"


def file_fingerprint(folder: str, name: str):
    """A loader's fingerprint_inputs: the file's modification time, so a rewritten file is loaded again."""
    path = folder_paths.get_full_path(folder, name)
    return os.path.getmtime(path) if path else name


def empty_folder_note(folder: str, how: str) -> str:
    """The sentence a loader's description carries for a dropdown that holds only the toy file."""
    return (f" The list shows the .safetensors files in models/{folder} (created at start-up), then "
            f"{TOY_FILES[folder]}, the toy world's (for Toy World Loader's model only). Only the toy file listed: "
            f"{how}, put it in models/{folder} and press R (refresh) in the graph editor.")


def node_list() -> list[type[io.ComfyNode]]:
    from .concepts import NODES as concept_nodes
    from .e4t import NODES as e4t_nodes
    from .instantbooth import NODES as instantbooth_nodes
    from .quicktune import NODES as quicktune_nodes
    from .toyworld import NODES as toyworld_nodes

    return (list(instantbooth_nodes) + list(quicktune_nodes) + list(e4t_nodes) + list(toyworld_nodes)
            + list(concept_nodes))


class BoothKitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
