"""`boothkit bench comfy-overhead`: sampling time per step inside a real ComfyUI, with and without the InstantBooth
Apply node, measured interleaved in one run. The model is an SD1.5-shaped UNet (ComfyUI's own SD15 model class,
random weights; --shape tiny for the test tier's 2-level one) at a 64×64 latent, cfg 7 so cond and uncond run as one
batch of 2, euler. Per-step times come from the sampler's step callback; the first step of each run (which also
computes f_p's keys/values) is left out; ratios compare each variant's fastest step (medians are printed too).
Needs COMFYUI_PATH; runs in ComfyUI's python ($COMFYUI_PYTHON, else the venv next to or inside the checkout) and
loads the pack with ComfyUI's own loader."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
TARGET_N1 = 1.25

def parse_args(argv):
    p = argparse.ArgumentParser(prog="boothkit bench comfy-overhead", description=__doc__)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default $COMFYUI_PATH)")
    p.add_argument("--python", default=None, help="ComfyUI's python (default $COMFYUI_PYTHON or its venv)")
    p.add_argument("--shape", choices=["sd15", "tiny"], default="sd15",
                   help="sd15: the SD1.5 UNet (860M); tiny: 2 levels, 1 block each (the test tier's)")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--steps", type=int, default=3, help="sampling steps per run (the first is not timed)")
    p.add_argument("--repeats", type=int, default=2, help="rounds; each runs every variant once")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--attention", choices=["pytorch", "comfy-cpu-default"], default="pytorch",
                   help="pytorch: ComfyUI's PyTorch attention, its default on NVIDIA GPUs; comfy-cpu-default: the "
                        "chunked sub-quadratic attention ComfyUI picks on a CPU (slower UNet, so lower ratios)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be at least 2 (the first step of a run is not timed)")
    return a


def comfyui_python(comfy_path: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    for venv in (comfy_path.parent / "venv", comfy_path / "venv", comfy_path / ".venv"):
        if (venv / "bin" / "python").exists():
            return str(venv / "bin" / "python")
    return sys.executable


def main(argv=None) -> int:
    a = parse_args(list(argv or []))
    if not a.comfyui:
        raise ValueError("comfy-overhead needs a ComfyUI checkout: set COMFYUI_PATH (or pass --comfyui)")
    comfy_path = Path(a.comfyui).resolve()
    if not (comfy_path / "main.py").is_file():
        raise FileNotFoundError(f"{comfy_path} is not a ComfyUI checkout (no main.py)")
    if a.worker:
        return worker(a, comfy_path)
    python = a.python or comfyui_python(comfy_path)
    cmd = [python, str(Path(__file__).resolve()), "--worker", "--comfyui", str(comfy_path)] + list(argv or [])
    return subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode


def load_pack() -> str:
    """Loads this pack through ComfyUI's own loader (ComfyUI set up and imported), from a custom_nodes link in a
    temporary folder; returns the module name the loader gives it."""
    import asyncio

    import nodes

    custom = Path(tempfile.mkdtemp(prefix="boothkit_bench_")) / "boothkit"
    custom.symlink_to(PACK_ROOT, target_is_directory=True)
    if not asyncio.run(nodes.load_custom_node(str(custom))):
        raise RuntimeError("ComfyUI could not load the BoothKit pack (see the log above)")
    return str(custom).replace(".", "_x_")


def worker(a, comfy_path: Path) -> int:
    """Runs inside ComfyUI's python (this file executed as a script)."""
    sys.path.insert(0, str(PACK_ROOT / "bench" / "comfy_support"))
    from make_models import UNETS, random_booth, setup_comfy
    from node_runner import pack_modules

    setup_comfy(str(comfy_path), pytorch_attention=a.attention == "pytorch")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models
    import nodes

    pack = load_pack()
    ibm, host = pack_modules(pack, "backend.instantbooth", "hosts.comfy.instantbooth")
    apply_node = nodes.NODE_CLASS_MAPPINGS["BoothKitInstantBoothApply"]

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    model_config = comfy.supported_models.SD15(dict(UNETS[a.shape]))
    model_config.set_inference_dtype(dtype, None)
    base = model_config.get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI leaves a model built without a checkpoint uninitialised
        for name, p in base.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.copy_((torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5).to(p.dtype))
            else:
                p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))  # norm scales, biases
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    booth = random_booth(model, host, ibm)  # gates at 0.5, a trained-looking value: the adapters really compute
    layout = booth.model.config.layout

    def patched(n, skip_levels=""):
        f_p = torch.randn(257 * n, 768, generator=gen)
        concept = host.BoothConcept(ibm.Concept(torch.randn(768, generator=gen), f_p, "sks", "person", n), booth)
        return apply_node.execute(model=model, concept=concept, beta=0.3, start_percent=0.0, end_percent=1.0,
                                  skip_levels=skip_levels, skip_blocks="").result[0]

    variants = {"plain (no InstantBooth)": model, "InstantBooth N=1": patched(1), "InstantBooth N=4": patched(4),
                "N=1, level 0 skipped": patched(1, "0")}
    cond = [[torch.randn(1, 77, 768, generator=gen), {}]]
    uncond = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = torch.zeros(1, 4, a.latent, a.latent)
    noise = torch.randn(latent.shape, generator=gen)

    def run(m, steps=a.steps) -> list[float]:
        stamps = []
        with torch.inference_mode():
            comfy.sample.sample(m, noise, steps, 7.0, "euler", "normal", cond, uncond, latent, disable_pbar=True,
                                callback=lambda *args: stamps.append(time.perf_counter()), seed=0)
        return [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])]  # step k ends at stamp k; step 0 is left out

    run(model, 2)  # warm-up: allocator, kernels (each run's own set-up, f_p K/V included, falls in its untimed step 0)
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(a.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated so no variant always runs first
            times[name] += run(variants[name])

    # the fastest step of each variant is the ratio's basis: on a shared machine, contention only ever adds time
    best = {name: min(ts) for name, ts in times.items()}
    median = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = {name: best[name] / best[names[0]] for name in names}
    ratio_median = {name: median[name] / median[names[0]] for name in names}
    params = sum(p.numel() for p in base.diffusion_model.parameters()) / 1e6
    n0 = sum(1 for lvl in layout.levels if lvl == 0)
    print(f"ComfyUI {comfy_path.name} @ {comfy_path}, UNet {a.shape} ({params:.0f}M params, {len(layout)} transformer "
          f"blocks, {n0} at level 0), latent {a.latent}x{a.latent}, cfg 7 (batch 2), euler, {a.dtype}, "
          f"{a.attention} attention, {torch.get_num_threads()} threads; {len(times[names[0]])} timed steps per "
          f"variant")
    print(f"{'variant':<28} {'best s/step':>11} {'ratio':>7} {'median s/step':>13} {'ratio':>7}")
    for name in names:
        print(f"{name:<28} {best[name]:11.3f} {ratio[name]:7.3f} {median[name]:13.3f} {ratio_median[name]:7.3f}")
    verdict = "meets" if ratio[names[1]] <= TARGET_N1 else "misses"
    print(f"N=1 {verdict} the target of <= {TARGET_N1}x (ratios of the best step; medians for reference)")
    print(json.dumps({"ratio": round(ratio[names[1]], 3), "ratio_n1": round(ratio[names[1]], 3),
                      "ratio_n4": round(ratio[names[2]], 3), "ratio_n1_skip_level0": round(ratio[names[3]], 3),
                      "ratio_n1_median": round(ratio_median[names[1]], 3),
                      "ratio_n4_median": round(ratio_median[names[2]], 3),
                      "baseline_s_per_step": round(best[names[0]], 4), "target_n1": TARGET_N1, "shape": a.shape,
                      "latent": a.latent, "dtype": a.dtype, "attention": a.attention}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
