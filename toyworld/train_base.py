"""Train the toy world's text-to-image base model (``toyworld/base.py``) on TRAIN identities, in pixel space.

The UNet and the tiny CLIP text encoder are trained jointly with the epsilon objective (min-SNR-5 weighting), 10 %
empty captions (for classifier-free guidance), AdamW and an EMA of the weights; the EMA weights are exported.
Every batch, noise draw and caption dropout is a function of (seed, step), so a resumed run sees exactly the data and
noise it would have seen without the interruption.

Checkpoints (safetensors: weights, EMA, optimizer, LR-schedule state, config) go to ``--run-dir`` every
``--ckpt-minutes`` (atomic writes, last 3 kept); ``--resume`` continues from the newest one. The EMA weights are
exported to ``--out``/base (a diffusers-style folder, fp16, with metadata) every ``--export-minutes`` and at the end,
and every exported file is recorded in ``--out``/MANIFEST.json with its sha256 and the reproduce command.

    python -m boothkit.toyworld.train_base --out toyworld/weights --steps 4000            # CPU, batch 32
    python -m boothkit.toyworld.train_base --out toyworld/weights --steps 4000 --resume   # continue
    python -m boothkit.toyworld.train_base --out toyworld/weights --export-from-checkpoint latest
    python -m boothkit.toyworld.train_base --out toyworld/weights --tokenizer-only
"""
from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import time
from pathlib import Path

import torch

from . import base as tb
from . import domain, store
from .tokenizer import TOKENIZER_DIR, build_tokenizer
from ..training.checkpoint import list_checkpoints, load_checkpoint, optimizer_from_tensors, save_checkpoint

log = logging.getLogger("boothkit.toyworld.train_base")

DEFAULT_RUN_DIR = "runs/toy_base"
SAMPLE_PROMPTS = [
    "a photo of a cat on grass at day", "a photo of a robot on grass at day",
    "a photo of a cat on snow at night with a tree", "a photo of a robot on snow at night with a tree",
    "a photo of a cat on sand at day with a ball", "a photo of a robot on water at day with a box",
    "a photo of a cat on road at night with a flower", "a photo of a robot on road at day with a flower",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m boothkit.toyworld.train_base", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(store.WEIGHTS_DIR), help="weights folder (gets base/ and tokenizer/)")
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="checkpoints, logs and sample grids")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=0, help="data-loader processes rendering batches")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    p.add_argument("--tiny", action="store_true", help="test-sized model (for the test suite)")
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--export-minutes", type=float, default=25.0, help="export the EMA weights this often mid-run")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--no-samples", action="store_true", help="skip the sample grid written at each export")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    p.add_argument("--export-from-checkpoint", metavar="PATH|latest",
                   help="only export the EMA weights of a checkpoint (no training)")
    p.add_argument("--tokenizer-only", action="store_true", help="only (re)build the tokenizer into --out")
    return p.parse_args(argv)


def reproduce_command(args) -> str:
    """The command that rebuilds the exported files (the flags that change the result, not resume/export flags)."""
    parts = ["python", "-m", "boothkit.toyworld.train_base", "--out", "toyworld/weights",
             "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
             "--warmup", str(args.warmup), "--ema-decay", str(args.ema_decay), "--seed", str(args.seed)]
    if args.device != "cpu":
        parts += ["--device", args.device]
    if args.bf16:
        parts.append("--bf16")
    if args.tiny:
        parts.append("--tiny")
    return shlex.join(parts)


def result_config(args) -> dict:
    """Everything that decides the trained weights (a resumed run must match it)."""
    return {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
            "ema_decay": args.ema_decay, "caption_dropout": args.caption_dropout, "seed": args.seed,
            "tiny": args.tiny, "bf16": args.bf16}


# ----------------------------------------------------------------------------------------------------------------
# data: a pure function of (seed, step)


def step_batch(seed: int, step: int, batch_size: int, tokenizer, caption_dropout: float):
    """(images in [-1,1] [B,3,R,R], token ids [B,77]) for one training step of TRAIN identities."""
    import numpy as np

    images, _, caps, _ = domain.batch("train", batch_size, seed=seed * 1_000_003 + step)
    rng = np.random.default_rng([seed, step, 7])
    drop = rng.random(batch_size) < caption_dropout
    caps = ["" if d else c for c, d in zip(caps, drop)]
    ids = tokenizer(caps, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    return images * 2 - 1, ids


class StepBatches(torch.utils.data.IterableDataset):
    """Batches for steps [start, end); with several workers, worker w makes the steps ≡ w (mod workers), which the
    DataLoader's round-robin hands back in step order."""

    def __init__(self, seed, start, end, batch_size, tokenizer, caption_dropout):
        super().__init__()
        self.seed, self.start, self.end = seed, start, end
        self.batch_size, self.tokenizer, self.caption_dropout = batch_size, tokenizer, caption_dropout

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        for step in range(self.start + wid, self.end, nw):
            x, ids = step_batch(self.seed, step, self.batch_size, self.tokenizer, self.caption_dropout)
            yield step, x, ids


# ----------------------------------------------------------------------------------------------------------------
# export


def ensure_tokenizer(out: Path, reproduce: str | None = None):
    """Build the tokenizer into ``out``/tokenizer and record it (deterministic, so rebuilding changes nothing)."""
    tok = build_tokenizer(out / TOKENIZER_DIR)
    files = sorted(p for p in (out / TOKENIZER_DIR).iterdir() if p.is_file())
    store.record(files, weights_dir=out,
                 reproduce=reproduce or "python -m boothkit.toyworld.train_base --out toyworld/weights "
                                        "--tokenizer-only")
    return tok


def export(args, model: tb.ToyBase, ema: dict[str, torch.Tensor], step: int, out: Path, run_dir: Path | None,
           wall_s: float) -> list[Path]:
    """Save the EMA weights as the shipped base model and record every file with the reproduce command."""
    import copy

    exported = tb.ToyBase(unet=copy.deepcopy(model.unet).float().cpu(),
                          text_encoder=copy.deepcopy(model.text_encoder).float().cpu(),
                          tokenizer=model.tokenizer, scheduler=model.scheduler)
    load_named(exported, ema)
    cmd = reproduce_command(args)
    meta = {"steps": str(step), "target_steps": str(args.steps), "seed": str(args.seed), "command": cmd,
            "batch_size": str(args.batch_size), "lr": str(args.lr), "ema_decay": str(args.ema_decay),
            "caption_dropout": str(args.caption_dropout), "device": args.device,
            "train_identities": str(len(domain.identities("train"))), "data": "toyworld.domain train split",
            "objective": "epsilon, min-SNR-5", "train_wall_s": f"{wall_s:.0f}"}
    files = tb.save_base(exported, out / tb.BASE_DIR, meta)
    store.record(files, weights_dir=out, reproduce=cmd)
    log.info("exported EMA weights of step %d to %s", step, out / tb.BASE_DIR)
    if run_dir is not None and not args.no_samples:
        try:
            exported.unet.to(args.device)
            exported.text_encoder.to(args.device)
            imgs = tb.sample(exported, SAMPLE_PROMPTS * 2, seed=0)
            grid = run_dir / f"samples_{step:06d}.png"
            tb.image_grid(imgs, nrow=len(SAMPLE_PROMPTS)).save(grid)
            log.info("sample grid (columns = %s; two seeds) -> %s", SAMPLE_PROMPTS, grid)
        except Exception:  # a failed preview must not lose the export
            log.exception("sample grid failed")
    return files


def named_weights(model: tb.ToyBase) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    out.update({f"text_encoder.{k}": v for k, v in model.text_encoder.state_dict().items()})
    return out


def load_named(model: tb.ToyBase, weights: dict[str, torch.Tensor]) -> None:
    u = {k[5:]: v for k, v in weights.items() if k.startswith("unet.")}
    t = {k[13:]: v for k, v in weights.items() if k.startswith("text_encoder.")}
    model.unet.load_state_dict(u)
    missing, unexpected = model.text_encoder.load_state_dict(t, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"checkpoint text encoder does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")


def record_existing(out: str | Path) -> list[Path]:
    """Re-record the files of an exported base folder (e.g. copied from another machine) with the reproduce command
    stored in their own metadata."""
    from ..backend.files import read_metadata

    out = Path(out)
    cmd = read_metadata(out / tb.BASE_DIR / tb.UNET_FILE)["command"]
    files = sorted(p for p in (out / tb.BASE_DIR).rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    store.record(files, weights_dir=out, reproduce=cmd)
    return files


# ----------------------------------------------------------------------------------------------------------------
# training


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out, run_dir = Path(args.out), Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = ensure_tokenizer(out)
    if args.tokenizer_only:
        log.info("tokenizer written to %s", out / TOKENIZER_DIR)
        return 0
    device = torch.device(args.device)

    torch.manual_seed(args.seed)  # the initial weights are part of what --seed reproduces
    model = tb.build_base(tokenizer, tiny=args.tiny)
    model.unet.to(device).train()
    model.text_encoder.to(device).train()
    params = list(model.unet.parameters()) + list(model.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    ema = {k: v.detach().clone().float() for k, v in named_weights(model).items()}
    step, wall_before = 0, 0.0

    ckpt_path = None
    if args.export_from_checkpoint:
        ckpts = list_checkpoints(run_dir)
        ckpt_path = Path(args.export_from_checkpoint) if args.export_from_checkpoint != "latest" else \
            (ckpts[-1] if ckpts else None)
        if ckpt_path is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint-*.safetensors to export from")
    elif args.resume:
        ckpts = list_checkpoints(run_dir)
        ckpt_path = ckpts[-1] if ckpts else None
        if ckpt_path is None:
            log.info("--resume: no checkpoint in %s, starting from scratch", run_dir)
    if ckpt_path is not None:
        step, weights, ema_w, opt_t, opt_meta, sched_state, cfg = load_checkpoint(ckpt_path)
        if cfg.get("result") is not None and not args.export_from_checkpoint:
            mine = result_config(args)
            diff = {k: (cfg["result"].get(k), v) for k, v in mine.items()
                    if k != "steps" and cfg["result"].get(k) != v}
            if diff:
                raise ValueError(f"{ckpt_path}: --resume with different settings (checkpoint, now): {diff}")
        if args.export_from_checkpoint:
            for k in ("steps", "batch_size", "lr", "warmup", "ema_decay", "seed", "bf16"):
                if k in cfg.get("result", {}):
                    setattr(args, k, cfg["result"][k])
            args.device = cfg.get("device", args.device)
        load_named(model, weights)
        ema = {k: v.float().to(device) for k, v in (ema_w or weights).items()}
        optimizer_from_tensors(opt, {k: v.to(device) for k, v in opt_t.items()}, opt_meta)
        sched.load_state_dict(sched_state)
        wall_before = float(cfg.get("wall_s", 0.0))
        log.info("loaded %s (step %d)", ckpt_path, step)
    ema = {k: v.to(device) for k, v in ema.items()}
    if args.export_from_checkpoint:
        export(args, model, {k: v.cpu() for k, v in ema.items()}, step, out, run_dir, wall_before)
        return 0

    loader = torch.utils.data.DataLoader(
        StepBatches(args.seed, step, args.steps, args.batch_size, tokenizer, args.caption_dropout),
        batch_size=None, num_workers=args.workers, prefetch_factor=4 if args.workers else None,
        persistent_workers=False)

    def checkpoint(at_step: int, wall_s: float) -> None:
        cfg = {"result": result_config(args), "device": args.device, "wall_s": wall_s,
               "command": reproduce_command(args)}
        save_checkpoint(run_dir, at_step, named_weights(model), opt, sched, cfg, ema=ema, keep_last=3)
        log.info("checkpoint step %d -> %s", at_step, run_dir)

    # SIGTERM/SIGINT: finish the step, checkpoint, export and exit cleanly (the step reached becomes --steps in the
    # reproduce command: the LR is constant after warmup, so a run with that --steps gives the same weights).
    stop = {"now": False}

    def request_stop(signum, _frame):
        log.info("signal %d: stopping after this step", signum)
        stop["now"] = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _train_loop(args, model, opt, sched, params, ema, step, wall_before, loader, out, run_dir, device,
                    checkpoint, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _train_loop(args, model, opt, sched, params, ema, step, wall_before, loader, out, run_dir, device, checkpoint,
                stop) -> None:
    alphas = model.scheduler.alphas_cumprod.to(device)
    n_t = model.scheduler.config.num_train_timesteps
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    t_start = time.time()
    last_ckpt = last_export = t_start
    t_log, n_acc = time.time(), 0
    ema_keys = sorted(ema)
    log.info("training %d -> %d steps, batch %d, device %s, bf16 %s, %.2fM UNet + %.2fM text params; log every %d",
             step, args.steps, args.batch_size, args.device, args.bf16,
             sum(p.numel() for p in model.unet.parameters()) / 1e6,
             sum(p.numel() for p in model.text_encoder.parameters()) / 1e6, args.log_every)
    for got_step, x, ids in loader:
        if got_step != step:
            raise RuntimeError(f"data order broken: got the batch of step {got_step} at step {step}")
        x, ids = x.to(device, non_blocking=True), ids.to(device, non_blocking=True)
        g = torch.Generator(device="cpu").manual_seed(args.seed * 1_000_003 + step)
        noise = torch.randn(x.shape, generator=g).to(device)
        t = torch.randint(0, n_t, (x.shape[0],), generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x + (1 - a).sqrt() * noise
        with autocast:
            ctx = model.text_encoder(input_ids=ids).last_hidden_state
            pred = model.unet(xt, t, encoder_hidden_states=ctx).sample
        snr = alphas[t] / (1 - alphas[t])
        w = torch.clamp(snr, max=5.0) / snr   # min-SNR-5 weighting for epsilon prediction
        loss = (w * ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            live = named_weights(model)
            keys = [k for k in ema_keys if live[k].dtype.is_floating_point]
            torch._foreach_lerp_([ema[k] for k in keys], [live[k].float() for k in keys], 1 - decay)
        n_acc += 1
        if step % args.log_every == 0:
            dt = (time.time() - t_log) / n_acc
            log.info("step %d/%d loss %.4f lr %.2e %.3f s/step", step, args.steps, float(loss.detach()),
                     sched.get_last_lr()[0], dt)
            t_log, n_acc = time.time(), 0
        now = time.time()
        if stop["now"]:
            args.steps = step
        done = step >= args.steps
        if done or now - last_ckpt >= args.ckpt_minutes * 60:
            checkpoint(step, wall_before + now - t_start)
            last_ckpt = now
        if done or now - last_export >= args.export_minutes * 60:
            export(args, model, {k: v.cpu() for k, v in ema.items()}, step, out, run_dir, wall_before + now - t_start)
            last_export = time.time()
        if done:
            break
    log.info("done: step %d, %.0f s this run", step, time.time() - t_start)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    raise SystemExit(main())
