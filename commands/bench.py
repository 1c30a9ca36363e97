"""`boothkit bench NAME`: each benchmark is bench/<name>.py with a main(argv). Every bench prints a readable table,
then as its last line one JSON object with its figures (ratios against a baseline measured in the same run)."""
from __future__ import annotations

import importlib
import sys

BENCHES = {
    "overhead": "InstantBooth adapters vs the plain SD1.5-shaped UNet, one denoising step (backend/diffusers host)",
    "comfy-overhead": "the same inside a real ComfyUI (needs COMFYUI_PATH)",
    "comfy-memory": "E4T Tune / Quick-Tune memory in a real ComfyUI, without and with gradient checkpointing",
    "train": "InstantBooth trainer throughput vs a plain training loop",
    "tune": "quick-tune step time vs reference loops in the style of diffusers' example scripts",
    "e4t": "E4T tuning vs two-stage quick-tune, wall time and peak memory",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: boothkit bench NAME [ARGS]\n\nbenchmarks:")
        for name, help_ in BENCHES.items():
            print(f"  {name:<15} {help_}")
        return 0
    name = argv[0]
    if name not in BENCHES:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHES)}")
    try:
        module = importlib.import_module(f"..bench.{name.replace('-', '_')}", package=__package__)
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(name.replace('-', '_')):
            print(f"benchmark {name!r} is not implemented yet", file=sys.stderr)
            return 2
        raise
    return int(module.main(argv[1:]) or 0)
