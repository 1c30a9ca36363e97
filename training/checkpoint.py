"""Training checkpoints in safetensors (no pickle): trained weights, optimizer and scheduler state, EMA, step and
the resolved config. Written atomically (temp file + rename); the last K are kept."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..backend.files import read_safetensors, write_safetensors

CHECKPOINT_FORMAT = "boothkit.checkpoint"
_NAME = re.compile(r"^checkpoint-(\d+)\.safetensors$")


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: str | Path, step: int, weights: dict[str, torch.Tensor], optimizer, scheduler,
                    config: dict, ema: dict[str, torch.Tensor] | None = None, keep_last: int = 3) -> Path:
    folder = Path(folder)
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    tensors = {f"weights.{k}": v for k, v in weights.items()}
    tensors.update(opt_tensors)
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
    meta = {
        "format": CHECKPOINT_FORMAT, "version": "1", "step": str(step),
        "optimizer": json.dumps(opt_meta), "scheduler": json.dumps(scheduler.state_dict()),
        "config": json.dumps(config, sort_keys=True, default=str),
    }
    path = write_safetensors(folder / f"checkpoint-{step:07d}.safetensors", tensors, meta)
    for old in list_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


MAX_STEP = 10 ** 9


def load_checkpoint(path: str | Path):
    """-> (step, weights, ema or None, optimizer tensors, optimizer meta, scheduler state, config). Every error names
    the file and the field; the tensors must be finite."""
    from ..backend.files import FormatError, check_finite

    tensors, meta = read_safetensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise FormatError(f"{path}: metadata field 'format' is {meta.get('format')!r}, expected "
                          f"'{CHECKPOINT_FORMAT}'")
    raw = meta.get("step")
    try:
        step = int(raw)
    except (TypeError, ValueError):
        raise FormatError(f"{path}: metadata field 'step' is {raw!r}, expected an integer") from None
    if not 0 <= step <= MAX_STEP:
        raise FormatError(f"{path}: metadata field 'step' is {step}, expected 0..{MAX_STEP}")
    parsed = {}
    for field, kind in (("optimizer", dict), ("scheduler", dict), ("config", dict)):
        try:
            parsed[field] = json.loads(meta[field])
        except KeyError:
            raise FormatError(f"{path}: metadata field '{field}' is missing, expected JSON") from None
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: metadata field '{field}' is not JSON ({e})") from None
        if not isinstance(parsed[field], kind):
            raise FormatError(f"{path}: metadata field '{field}' is {str(parsed[field])[:60]!r}, expected a JSON "
                              f"object")
    opt_meta = parsed["optimizer"]
    if not isinstance(opt_meta.get("param_groups"), list) or not isinstance(opt_meta.get("scalars"), dict):
        raise FormatError(f"{path}: metadata field 'optimizer' has no 'param_groups' list and 'scalars' object")
    check_finite(path, tensors)
    weights = {k[8:]: v for k, v in tensors.items() if k.startswith("weights.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
    opt = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    if step > 0 and not opt:
        raise FormatError(f"{path}: no optimizer state (tensors 'optimizer.*') in a checkpoint at step {step}; "
                          f"expected the state to resume from")
    return step, weights, ema, opt, opt_meta, parsed["scheduler"], parsed["config"]
