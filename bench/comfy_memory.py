"""`boothkit bench comfy-memory`: peak memory of the E4T Tune or Quick-Tune Concept node's work inside a real ComfyUI,
without and with the node's gradient checkpointing, each in a fresh process. The models are random-weight files in
the SD1.5 layout (bench/comfy_support/make_models.py, built once into a cache folder: the whole SD1.5 UNet, CLIP-L, the SD
VAE and a ViT-L/14 vision tower), the E4T an untrained one sized for that UNet (offsets of rank 1 on every Linear of
the transformer blocks, as `boothkit bench e4t --model sd15`). Peak RSS (and the CUDA peak where ComfyUI runs on a
GPU) is read after the loaded models, so "above the models" is what the node adds. The last line's `ratio` is the
checkpointed run's memory above the models over the plain run's. Needs COMFYUI_PATH; runs in ComfyUI's python."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
MODELS_SCRIPT = PACK_ROOT / "bench" / "comfy_support" / "make_models.py"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="boothkit bench comfy-memory", description=__doc__)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default $COMFYUI_PATH)")
    p.add_argument("--python", default=None, help="ComfyUI's python (default $COMFYUI_PYTHON or its venv)")
    p.add_argument("--method", choices=["e4t", "quicktune"], default="e4t")
    p.add_argument("--shape", choices=["sd15", "tiny"], default="sd15",
                   help="sd15: the whole SD1.5 UNet; tiny: the test tier's 2-level one")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="E4T steps, or steps of each quick-tune stage")
    p.add_argument("--photos", type=int, default=4, help="quick-tune's photos (E4T takes one)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU even where a GPU is present")
    cache = Path.home() / ".cache" / "boothkit" / "comfyui-bench-models"
    p.add_argument("--models", default=os.environ.get("BOOTHKIT_COMFY_BENCH_MODELS", str(cache)),
                   help="folder for the random-weight model files (built there once, about 2.7 GB for sd15)")
    p.add_argument("--worker", choices=["off", "on"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be at least 1")
    return a


def main(argv=None) -> int:
    from .comfy_overhead import comfyui_python

    argv = list(argv or [])
    a = parse_args(argv)
    if not a.comfyui:
        raise ValueError("comfy-memory needs a ComfyUI checkout: set COMFYUI_PATH (or pass --comfyui)")
    comfy_path = Path(a.comfyui).resolve()
    if not (comfy_path / "main.py").is_file():
        raise FileNotFoundError(f"{comfy_path} is not a ComfyUI checkout (no main.py)")
    python = a.python or comfyui_python(comfy_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(f"random-weight models in {a.models} (built once)", flush=True)
    subprocess.run([python, str(MODELS_SCRIPT), "--comfyui", str(comfy_path), "--out", a.models, "--shape", a.shape],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    runs = {}
    for mode in ("off", "on"):
        out = subprocess.run([python, str(Path(__file__).resolve()), "--worker", mode, "--comfyui", str(comfy_path)]
                             + argv, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    off, on = runs["off"], runs["on"]
    cuda = off.get("cuda_above_gb") is not None
    print(f"{a.method} in ComfyUI {comfy_path.name}, {a.shape} UNet, {a.resolution} px, {a.steps} step(s)"
          f"{' per stage' if a.method == 'quicktune' else ''}, {off['device']}, {off['threads']} threads")
    print(f"{'gradient checkpointing':<24} {'peak RSS GB':>11} {'above models':>12} "
          f"{'CUDA peak GB':>12} {'above models':>12} {'wall s':>7}")
    for mode, r in runs.items():
        cu = f"{r['cuda_peak_gb']:12.2f} {r['cuda_above_gb']:12.2f}" if cuda else f"{'-':>12} {'-':>12}"
        print(f"{mode:<24} {r['peak_gb']:11.2f} {r['above_gb']:12.2f} {cu} {r['wall_s']:7.1f}"
              + ("  (RSS: no higher than while loading; an upper bound)" if r["below_loading_peak"] else ""))
    key = "cuda_above_gb" if cuda else "above_gb"
    figures = {"ratio": round(on[key] / off[key], 3), "ratio_rss": round(on["above_gb"] / off["above_gb"], 3),
               "time_ratio": round(on["wall_s"] / off["wall_s"], 3), "method": a.method, "shape": a.shape,
               "resolution": a.resolution, "steps": a.steps, "device": off["device"]}
    for mode, r in runs.items():
        for k in ("peak_gb", "above_gb", "cuda_peak_gb", "cuda_above_gb", "wall_s"):
            if r.get(k) is not None:
                figures[f"{k}_{mode}"] = r[k]
    print(json.dumps(figures))
    return 0


def worker(a) -> int:
    """Runs inside ComfyUI's python (this file executed as a script): one node run, its peaks as a JSON line."""
    sys.path[:0] = [str(MODELS_SCRIPT.parent), str(Path(__file__).resolve().parent)]
    from comfy_overhead import load_pack
    from make_models import CHECKPOINTS, CLIP_VISION, random_e4t, setup_comfy
    from node_runner import add_model_folders, node_runner, pack_modules

    import torch

    setup_comfy(a.comfyui, pytorch_attention=True, cpu=a.cpu or not torch.cuda.is_available())
    if a.threads:
        torch.set_num_threads(a.threads)
    import comfy.model_management as mm

    pack = load_pack()
    bench_e4t, backend_e4t, e4t_host, quicktune_host = pack_modules(pack, "bench.e4t", "backend.e4t", "hosts.comfy.e4t",
                                                                     "hosts.comfy.quicktune")
    rss_mb = bench_e4t.rss_mb

    def gb(field):  # /proc's kB / 1e6, the table's GB
        return rss_mb(field) * 1024 / 1e6

    add_model_folders(a.models)
    run = node_runner()  # nodes called as ComfyUI's executor calls them
    model, clip, vae = run("CheckpointLoaderSimple", ckpt_name=CHECKPOINTS[a.shape])[:3]
    on = a.worker == "on"
    image = torch.rand(1, a.resolution, a.resolution, 3, generator=torch.Generator().manual_seed(0))
    if a.method == "e4t":
        (clip_vision,) = run("CLIPVisionLoader", clip_name=CLIP_VISION)
        e4t, _ = random_e4t(model, clip_vision, e4t_host, backend_e4t, rank=1)

        def work():
            return e4t_host.e4t_tune(model, clip, clip_vision, vae, e4t, image, "person", steps=a.steps,
                                 resolution=a.resolution, gradient_checkpointing=on)
        loaded = [model, clip.patcher, clip_vision.patcher]
    else:
        def work():
            return quicktune_host.quick_tune(model, clip, vae, image.expand(a.photos, -1, -1, -1), "person",
                                   embedding_steps=a.steps, denoiser_steps=a.steps, resolution=a.resolution,
                                   gradient_checkpointing=on)
        loaded = [model, clip.patcher]
    with torch.inference_mode():
        mm.load_models_gpu(loaded)
    cuda = torch.device(model.load_device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated() / 1e9
    before, loading_peak = gb("VmRSS"), gb("VmHWM")
    t = time.perf_counter()
    with torch.inference_mode():
        out = work()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    peak = gb("VmHWM")
    r = {"mode": a.worker, "device": str(model.load_device), "threads": torch.get_num_threads(),
         "rss_before_gb": round(before, 3), "peak_gb": round(peak, 3), "above_gb": round(peak - before, 3),
         # the peak is the process's: where the node stays below the loading's, "above" is only an upper bound
         "below_loading_peak": peak <= loading_peak, "wall_s": round(wall, 2), "report": out.report,
         "cuda_peak_gb": None, "cuda_above_gb": None}
    if cuda:
        cuda_peak = torch.cuda.max_memory_allocated() / 1e9
        r.update(cuda_peak_gb=round(cuda_peak, 3), cuda_above_gb=round(cuda_peak - cuda_before, 3))
    print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker(parse_args(sys.argv[1:])))
