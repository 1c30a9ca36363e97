"""The training machinery every BoothKit method shares (InstantBooth and E4T): accelerate for devices,
processes and mixed precision; gradient accumulation; atomic checkpoints with exact resume; a NaN guard; EMA;
progress, TensorBoard, samples and validation. A method supplies its trainable module, its parameter groups, a loss
for a list of dataset indices, and an export.

Determinism: every micro-batch draws its data, noise and augmentation from generators seeded by
(seed, step, micro-batch, process), so a run resumed from a checkpoint continues exactly as if never stopped."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..backend.files import all_finite, nonfinite
from .checkpoint import list_checkpoints, load_checkpoint, optimizer_from_tensors, save_checkpoint

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training stopped early (non-finite loss or weights); the message names the last good checkpoint."""


def check_output_dir(out: str | Path, name: str, resume: bool, overwrite: bool, delete: bool = True) -> None:
    """A fresh run refuses a folder that holds another run's checkpoints or export (the new run's checkpoints would
    be deleted by keep_last while the old run's stay, and a later --resume would continue the old run), unless told:
    ``resume`` continues that run; ``overwrite`` deletes its checkpoints and lets the export be replaced. Checked
    before anything is loaded."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file")
    found = list_checkpoints(out / "checkpoints")
    export = out / f"{name}.safetensors"
    if resume or not (found or export.exists()):
        return
    held = ([f"{len(found)} checkpoint(s) up to {found[-1].name}"] if found else []) + \
        ([f"the export {export.name}"] if export.exists() else [])
    if not overwrite:
        raise ValueError(f"output folder {out} holds another run ({' and '.join(held)}); pass --resume to continue "
                         f"it, --overwrite to start afresh there (its checkpoints are deleted), or choose another "
                         f"--output-dir")
    if delete:  # the main process; every process checks, so none goes on alone to wait at a barrier
        for p in found:
            p.unlink(missing_ok=True)
        log.info("--overwrite: deleted %d checkpoint(s) of the earlier run in %s", len(found), out / "checkpoints")


@dataclass
class TrainSettings:
    output_dir: str = "runs/train"
    steps: int = 1000  # optimizer steps
    batch_size: int = 4  # per process and micro-batch
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 200
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0  # 0 = only at the end
    validate_every: int = 0
    ema_decay: float = 0.0  # 0 = no EMA
    extra: dict = field(default_factory=dict)


class Method(Protocol):
    name: str
    module: torch.nn.Module  # holds exactly the trained parameters

    def param_groups(self) -> list[dict]: ...
    def loss(self, indices: list[int], generator: torch.Generator) -> torch.Tensor: ...
    def export(self, path: Path, weights: dict[str, torch.Tensor], config: dict) -> Path: ...
    def sample(self, out_dir: Path, step: int) -> Path | None: ...
    def validate(self) -> dict[str, float]: ...


def _micro_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + micro * 101 + rank) % (2**63 - 1)


class Trainer:
    def __init__(self, method: Method, dataset, settings: TrainSettings, config: dict):
        from accelerate import Accelerator

        if settings.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision is {settings.mixed_precision!r}; expected no, bf16 or fp16")
        if settings.steps <= 0 or settings.batch_size <= 0 or settings.grad_accum <= 0:
            raise ValueError("steps, batch_size and grad_accum must be positive")
        self.method, self.dataset, self.s, self.config = method, dataset, settings, config
        self.out = Path(settings.output_dir)
        log_with = None
        try:
            import tensorboard  # noqa: F401  (optional: logs go to TensorBoard when it is installed)

            log_with = "tensorboard"
        except ImportError:
            pass
        mp = settings.mixed_precision
        if mp == "fp16" and not torch.cuda.is_available():
            raise ValueError("fp16 mixed precision needs a GPU; use bf16 on CPU")
        # cpu=True without a GPU: accelerate then forms a gloo process group from torchrun/accelerate-launch env
        # Mixed precision is our own autocast (and GradScaler for fp16) rather than accelerate's, whose state is a
        # process-wide singleton: one process can then host trainers of different precisions (benches, tests).
        self.acc = Accelerator(log_with=log_with, project_dir=str(self.out), cpu=not torch.cuda.is_available())
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
        self.scaler = torch.amp.GradScaler("cuda") if mp == "fp16" else None
        log.info("processes: %d (%s), device %s", self.acc.num_processes, self.acc.distributed_type.value,
                 self.acc.device)
        self.params = [p for p in method.module.parameters() if p.requires_grad]
        self.names = [n for n, p in method.module.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(method.param_groups(), weight_decay=0.0)
        warm = max(settings.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.ema = ({n: p.detach().clone() for n, p in zip(self.names, self.params)}
                    if settings.ema_decay > 0 else None)
        self.step = 0

    # ---- state ------------------------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self.params)}

    def checkpoint(self) -> Path | None:
        if not self.acc.is_main_process:
            return None
        path = save_checkpoint(self.out / "checkpoints", self.step, self.weights(), self.optimizer, self.scheduler,
                               self.config, self.ema, self.s.keep_last)
        log.info("checkpoint %s", path)
        return path

    def resume(self) -> bool:
        found = list_checkpoints(self.out / "checkpoints")
        if not found:
            log.info("no checkpoint in %s; starting from step 0", self.out / "checkpoints")
            return False
        step, weights, ema, opt_t, opt_meta, sched, _ = load_checkpoint(found[-1])
        params = dict(zip(self.names, self.params))
        if set(weights) != set(params):
            raise ValueError(f"{found[-1]}: its weights do not match this method's trainable parameters "
                             f"(missing {sorted(set(params) - set(weights))[:3]}, "
                             f"unexpected {sorted(set(weights) - set(params))[:3]})")
        wrong = [(n, tuple(weights[n].shape), tuple(p.shape)) for n, p in params.items()
                 if weights[n].shape != p.shape]
        if wrong:
            n, found_shape, want = wrong[0]
            raise ValueError(f"{found[-1]}: weight '{n}' has shape {found_shape}, this run's model has {want} "
                             f"({len(wrong)} such); the checkpoint is of another configuration")
        if step > self.s.steps:
            raise ValueError(f"{found[-1]}: step {step} is beyond this run's train.steps={self.s.steps}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n])
        try:
            optimizer_from_tensors(self.optimizer, opt_t, opt_meta)
            self.scheduler.load_state_dict(sched)
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise ValueError(f"{found[-1]}: its optimizer or scheduler state does not fit this run "
                             f"({' '.join(str(e).split())[:160]})") from None
        if self.ema is not None and ema is not None:
            self.ema = {k: v.clone() for k, v in ema.items()}
        self.step = step
        log.info("resumed from %s at step %d", found[-1], step)
        return True

    # ---- loop -------------------------------------------------------------------------------------------
    def micro_step(self, micro: int) -> torch.Tensor:
        acc, s = self.acc, self.s
        seed = _micro_seed(s.seed, self.step, micro, acc.process_index)
        torch.manual_seed(seed)  # kornia's augmentation draws from the global generator
        g = torch.Generator().manual_seed(seed)
        position = self.step * s.grad_accum + micro
        idx = self.dataset.indices(s.seed, position, s.batch_size, acc.process_index, acc.num_processes)
        with torch.autocast(acc.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss = self.method.loss(idx, g)
        return loss

    def optimizer_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss."""
        acc, s = self.acc, self.s
        total = 0.0
        for micro in range(s.grad_accum):
            loss = self.micro_step(micro)
            check = acc.gather(loss.detach().float().reshape(1))
            if not torch.isfinite(check).all():
                self._stop(f"loss became {check.tolist()} at step {self.step}")
            scaled = loss / s.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.item() / s.grad_accum
        if acc.num_processes > 1:  # data parallel: average the gradients of every process
            for p in self.params:
                if p.grad is not None:
                    p.grad.copy_(acc.reduce(p.grad, reduction="mean"))
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # the guard checks the weights too: a finite loss with a NaN/inf learning rate or an overflow still poisons
        # them, and no checkpoint may be called good without its tensors checked (write_safetensors refuses them too)
        broken = torch.tensor([0.0 if all_finite(self.params) else 1.0], device=acc.device)
        if acc.gather(broken).sum() > 0:
            names = nonfinite(dict(zip(self.names, self.params)))
            where = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "on another process"
            self._stop(f"weights became non-finite at step {self.step + 1} ({where})")
        if self.ema is not None:
            with torch.no_grad():
                for n, p in zip(self.names, self.params):
                    self.ema[n].lerp_(p.detach(), 1 - s.ema_decay)
        self.step += 1
        return total

    def _stop(self, what: str):
        good = list_checkpoints(self.out / "checkpoints")
        raise TrainingStopped(f"{what}; stopped without saving. Last good checkpoint (its tensors checked finite when "
                              f"written): {good[-1] if good else 'none'} (resume from it with a lower learning rate, "
                              f"or check the data)")

    def train(self, resume: bool = False, overwrite: bool = False) -> Path:
        acc, s = self.acc, self.s
        check_output_dir(self.out, self.method.name, resume, overwrite, delete=acc.is_main_process)
        acc.wait_for_everyone()
        if resume:
            self.resume()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if acc.log_with:
                acc.init_trackers("boothkit", config={k: str(v) for k, v in asdict(s).items()})
        last_good = None
        from tqdm.auto import tqdm

        bar = tqdm(total=s.steps, initial=self.step, disable=not acc.is_main_process, desc=self.method.name,
                   dynamic_ncols=True)
        t0, steps0 = time.perf_counter(), self.step
        while self.step < s.steps:
            try:
                total = self.optimizer_step()
            except TrainingStopped:
                bar.close()
                raise
            bar.update(1)
            rate = (self.step - steps0) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{total:.4f}", it_s=f"{rate:.2f}")
            if self.step % s.log_every == 0 and acc.log_with:
                acc.log({"loss": total, "lr": self.scheduler.get_last_lr()[0]}, step=self.step)
            if s.checkpoint_every and self.step % s.checkpoint_every == 0:
                last_good = self.checkpoint()
            if s.validate_every and self.step % s.validate_every == 0 and acc.is_main_process:
                self._validate()
            if s.sample_every and self.step % s.sample_every == 0 and acc.is_main_process:
                self.method.sample(self.out / "samples", self.step)
        bar.close()
        if last_good is None or self.step % s.checkpoint_every:
            self.checkpoint()
        exported = None
        if acc.is_main_process:  # the final validation and samples, unless the loop just did them at this step
            if s.validate_every and (self.step == steps0 or self.step % s.validate_every):
                self._validate()
            if not s.sample_every or self.step == steps0 or self.step % s.sample_every:
                self.method.sample(self.out / "samples", self.step)
            weights = self.ema if self.ema is not None else self.weights()
            exported = self.method.export(self.out / f"{self.method.name}.safetensors", weights, self.config)
            log.info("exported %s", exported)
        acc.wait_for_everyone()
        acc.end_training()
        return exported

    def _validate(self):
        metrics = self.method.validate()
        if metrics:
            log.info("validation at step %d: %s", self.step,
                     ", ".join(f"{k}={v:.6g}" for k, v in metrics.items() if math.isfinite(v)))
            if self.acc.log_with:
                self.acc.log({f"val/{k}": v for k, v in metrics.items()}, step=self.step)
