"""`boothkit bench e4t`: wall time and peak memory of a 15-step E4T tune against the default two-stage quick-tune on
the same concept, in the same run.

Each measurement runs in its own process (the two methods never share an allocator, so peak memory is each one's
own), rounds interleaved; times are the tune alone (model loading excluded), medians over rounds. Memory: peak RSS
of the process and its growth over the loaded models (CPU), and on a GPU the CUDA peak and its growth. Models:
``toy`` (default: the toy world's base, CLIP backbone and E4T file — an untrained E4T of the same shape if none
ships; the weights do not change the speed) or ``sd15`` (the SD1.5 architecture with random weights and a
ViT-L/14-shaped CLIP vision backbone, for GPU memory figures). Last line: one JSON object with ``ratio`` (E4T time /
quick-tune time; target <= 0.1) and the memory figures."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="boothkit bench e4t", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("toy", "sd15"), default="toy")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--e4t-steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="E4T with gradient checkpointing")
    p.add_argument("--e4t-mixed-precision", choices=("no", "bf16"), default="no",
                   help="E4T's tune under bf16 autocast (default: fp32, as the node and `boothkit tune` run it; "
                        "quick-tune keeps its own default, bf16 on a GPU)")
    p.add_argument("--resolution", type=int,
                   help="sd15: the photo's size in pixels (default: 512 on a GPU, 256 on a CPU); toy: its own 32")
    p.add_argument("--only-e4t", action="store_true",
                   help="measure E4T alone (memory of an SD1.5-shaped tune on a CPU, where the 400 quick-tune steps "
                        "would take hours); no ratio then")
    p.add_argument("--child", choices=("e4t", "quicktune"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_mb(field: str) -> float:
    """A memory field of this process in MB (/proc's kB / 1024): VmRSS now, VmHWM its peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _vision(model_name: str, device):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..toyworld.scorers import load_clip_vision as toy_clip_vision

    if model_name == "toy":
        return toy_clip_vision()[0].eval().to(device)
    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, projection_dim=768)
    return CLIPVisionModelWithProjection(cfg).to(device).eval()


def child(args) -> dict:
    import torch

    from ..backend.e4t import E4T
    from ..hosts.diffusers.common import default_resolution
    from ..hosts.diffusers.loading import default_device
    from .tune import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device(None if args.device == "auto" else args.device)
    model = load_model(args.model, device, args.resolution if args.model == "sd15" else None)
    from ..toyworld import domain

    ident = domain.identities("heldout")[0]
    refs = domain.identity_renders(ident, 4, 0)
    size = default_resolution(model)  # load_model's choice: --resolution, or its default for the device
    resize = args.model == "sd15"  # the toy renders are at the toy model's size already
    images = [torch.nn.functional.interpolate(s.image[None], size=size, mode="bilinear")[0] if resize else s.image
              for s in refs]
    masks = [torch.nn.functional.interpolate(s.mask[None], size=size)[0] if resize else s.mask for s in refs]
    noun = domain.CLASS_NOUNS[ident.class_name][0] if args.model == "toy" else "cat"
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def in_use():  # (RSS, CUDA memory allocated) in MB: the base that growth is measured from
        return rss_mb("VmRSS"), torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None

    base_rss, base_cuda = in_use()
    if args.child == "e4t":
        from ..hosts.diffusers.e4t import e4t_tune, new_config

        vision = _vision(args.model, device)
        e4t = None
        if args.model == "toy":
            from ..backend.e4t import load_e4t
            from ..toyworld import store

            try:
                e4t = load_e4t(store.verified("e4t.safetensors"), family="toy")
            except store.WeightsError:
                pass
        e4t = e4t or E4T(new_config(model, vision, noun, "sks"))
        base_rss, base_cuda = in_use()
        if args.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            model.unet.train()
        t0 = time.perf_counter()
        concept = e4t_tune(model, vision, e4t, images[0], masks[0], noun, steps=args.e4t_steps,
                           mixed_precision=args.e4t_mixed_precision)
        steps = concept.result.steps
    else:
        from ..backend.quicktune import QuickTuneConfig
        from ..toyworld.methods import quicktune_config
        from ..hosts.diffusers.quicktune import quick_tune

        config = quicktune_config() if args.model == "toy" else QuickTuneConfig.sd()
        t0 = time.perf_counter()
        result = quick_tune(model, images, noun, masks=masks, config=config)
        steps = result.stage1.steps + result.stage2.steps
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": steps, "rss_peak_mb": rss_mb("VmHWM"), "rss_base_mb": base_rss,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            "cuda_base_mb": base_cuda,
            "device": str(device), "size": size}


def run_child(args, which: str) -> dict:
    cmd = [sys.executable, "-m", "boothkit.cli", "bench", "e4t", "--child", which, "--model", args.model,
           "--device", args.device, "--e4t-steps", str(args.e4t_steps), "--threads", str(args.threads)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    cmd += ["--e4t-mixed-precision", args.e4t_mixed_precision]
    if args.resolution:
        cmd += ["--resolution", str(args.resolution)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench child {which} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    which_all = ["e4t"] if args.only_e4t else ["e4t", "quicktune"]
    runs: dict[str, list[dict]] = {w: [] for w in which_all}
    for r in range(args.rounds):
        for which in (which_all if r % 2 == 0 else which_all[::-1]):
            runs[which].append(run_child(args, which))
            print(f"round {r + 1} {which}: {runs[which][-1]['seconds']:.2f} s", file=sys.stderr)

    def med(which, key):
        vals = [x[key] for x in runs.get(which, []) if x[key] is not None]
        return statistics.median(vals) if vals else None

    def growth(which, peak="rss_peak_mb", base="rss_base_mb"):
        vals = [x[peak] - x[base] for x in runs.get(which, []) if x[peak] is not None]
        return statistics.median(vals) if vals else None

    device = runs["e4t"][0]["device"]
    size = runs["e4t"][0]["size"]
    print(f"E4T tune vs two-stage quick-tune, model {args.model}, {size} px, device {device}, median of {args.rounds}; "
          f"E4T mixed precision {args.e4t_mixed_precision}; growth = peak above the loaded models")
    print(f"{'method':<22}{'steps':>7}{'time s':>10}{'RSS peak MB':>14}{'RSS growth MB':>15}{'CUDA peak MB':>14}"
          f"{'CUDA growth MB':>16}")
    fmt = lambda v, w: f"{v:>{w}.0f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
    for which, label in (("e4t", f"E4T ({args.e4t_steps} steps)"), ("quicktune", "quick-tune (default)")):
        if which not in runs:
            continue
        print(f"{label:<22}{runs[which][0]['steps']:>7}{med(which, 'seconds'):>10.2f}"
              f"{fmt(med(which, 'rss_peak_mb'), 14)}{fmt(growth(which), 15)}{fmt(med(which, 'cuda_peak_mb'), 14)}"
              f"{fmt(growth(which, 'cuda_peak_mb', 'cuda_base_mb'), 16)}")
    e, q = med("e4t", "seconds"), med("quicktune", "seconds")
    rnd = lambda v, n=1: None if v is None else round(v, n)  # noqa: E731
    result = {"ratio": rnd(e / q, 4) if q else None, "e4t_s": rnd(e, 3), "quicktune_s": rnd(q, 3)}
    for which in ("e4t", "quicktune"):
        result.update({f"{which}_rss_peak_mb": rnd(med(which, "rss_peak_mb")),
                       f"{which}_rss_growth_mb": rnd(growth(which)),
                       f"{which}_cuda_peak_mb": rnd(med(which, "cuda_peak_mb")),
                       f"{which}_cuda_growth_mb": rnd(growth(which, "cuda_peak_mb", "cuda_base_mb"))})
    result.update(model=args.model, device=device, size=size, e4t_mixed_precision=args.e4t_mixed_precision)
    print(json.dumps(result))
    return 0
