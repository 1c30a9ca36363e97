"""`boothkit train METHOD --config FILE [--set section.key=value ...] [--resume | --overwrite]`.

Works unchanged under `accelerate launch` (multi-GPU, multi-node, or several CPU processes with gloo)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..training.config import apply_overrides, build, read_config
from .args import Parser, positive_int

log = logging.getLogger(__name__)
METHODS = ("instantbooth", "e4t")


def parse_args(argv=None):
    p = Parser(prog="boothkit train", description=__doc__)
    p.add_argument("method", choices=METHODS)
    p.add_argument("--config", required=True, help="TOML or YAML file with [model], [data], [method], [train]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--output-dir", help="shorthand for --set train.output_dir=...")
    p.add_argument("--steps", type=positive_int, help="shorthand for --set train.steps=...")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output folder that holds another run (its checkpoints are deleted and "
                        "its export replaced); without it, or --resume, such a folder is refused")
    return p.parse_args(argv)


def resolve(args) -> dict:
    config = read_config(args.config)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    return apply_overrides(config, overrides)


def _load(config: dict):
    """The frozen base model and CLIP vision backbone, the training and validation folders, the trainer settings."""
    from .models import load_model, load_vision
    from ..training.data import FolderDataset
    from ..training.trainer import TrainSettings

    m, d = config.get("model", {}), config.get("data", {})
    if "base" not in m:
        raise ValueError("the config needs [model] base = ...")
    if "train" not in d:
        raise ValueError("the config needs [data] train = ...")
    settings = build(TrainSettings, config["train"], "train")
    model = load_model(m["base"], config=m.get("config"))
    vision = load_vision(m.get("clip_vision", "toy"))
    skip = bool(d.get("skip_bad", False))
    dataset = FolderDataset(d["train"], model.resolution, skip_bad=skip)
    validation = FolderDataset(d["validation"], model.resolution, skip_bad=skip) if d.get("validation") else None
    return model, vision, dataset, validation, settings


def run(method_name: str, config: dict, resume: bool, overwrite: bool = False) -> Path:
    from accelerate import PartialState

    from ..training.trainer import Trainer, TrainSettings, check_output_dir

    if method_name == "instantbooth":
        from ..training.instantbooth import InstantBoothSettings as Settings, InstantBoothTraining as Training
    else:
        from ..training.e4t import E4TSettings as Settings, E4TTraining as Training
    # every value checked, and the output folder, before a minute of loading, not after
    method_settings = build(Settings, config.get("method", {}), "method")
    settings = build(TrainSettings, config.get("train", {}), "train")
    check_output_dir(settings.output_dir, method_name, resume, overwrite,
                     delete=PartialState(cpu=not torch.cuda.is_available()).is_main_process)
    model, vision, dataset, validation, settings = _load(config)
    config = {**config, "train": dataclasses.asdict(settings), "method": dataclasses.asdict(method_settings)}
    torch.manual_seed(settings.seed)  # the trained modules' initial weights are part of the run's seed
    device = PartialState(cpu=not torch.cuda.is_available()).device
    method = Training(model, vision, dataset, method_settings, validation, device=device)
    return Trainer(method, dataset, settings, config).train(resume=resume, overwrite=overwrite)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = resolve(args)
    path = run(args.method, config, args.resume, args.overwrite)
    if path is not None:
        print(f"wrote {path}")
    return 0
