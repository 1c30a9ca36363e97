"""`boothkit train METHOD --config FILE [--set section.key=value ...] [--resume]`.

Works unchanged under `accelerate launch` (multi-GPU, multi-node, or several CPU processes with gloo)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from .config import apply_overrides, build, read_config

log = logging.getLogger(__name__)
METHODS = ("instantbooth",)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="boothkit train", description=__doc__)
    p.add_argument("method", choices=METHODS)
    p.add_argument("--config", required=True, help="TOML or YAML file with [model], [data], [method], [train]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--output-dir", help="shorthand for --set train.output_dir=...")
    p.add_argument("--steps", type=int, help="shorthand for --set train.steps=...")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    return p.parse_args(argv)


def resolve(args) -> dict:
    config = read_config(args.config)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    return apply_overrides(config, overrides)


def run_instantbooth(config: dict, resume: bool) -> Path:
    from ..hosts.loading import load_clip_vision, load_sd
    from .data import FolderDataset
    from .instantbooth import InstantBoothSettings, InstantBoothTraining
    from .trainer import Trainer, TrainSettings

    m, d = config["model"], config["data"]
    settings = build(TrainSettings, config["train"], "train")
    method_settings = build(InstantBoothSettings, config["method"], "method")
    for key in ("base", "train"):
        if key not in (m if key == "base" else d):
            raise ValueError(f"the config needs [{'model' if key == 'base' else 'data'}] {key} = ...")
    model = load_sd(m["base"], config=m.get("config"))
    vision = load_clip_vision(m.get("clip_vision", "toy"))
    dataset = FolderDataset(d["train"], model.resolution, skip_bad=bool(d.get("skip_bad", False)))
    validation = (FolderDataset(d["validation"], model.resolution, skip_bad=bool(d.get("skip_bad", False)))
                  if d.get("validation") else None)
    config = {**config, "train": dataclasses.asdict(settings), "method": dataclasses.asdict(method_settings)}
    from accelerate import PartialState

    torch.manual_seed(settings.seed)  # the heads' and adapters' initial weights are part of the run's seed
    method = InstantBoothTraining(model, vision, dataset, method_settings, validation, device=PartialState(cpu=not torch.cuda.is_available()).device)
    return Trainer(method, dataset, settings, config).train(resume=resume)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = resolve(args)
    path = {"instantbooth": run_instantbooth}[args.method](config, args.resume)
    if path is not None:
        print(f"wrote {path}")
    return 0
