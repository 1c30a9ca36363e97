"""`boothkit average FILE FILE [FILE ...] --output OUT`: one InstantBooth file whose weights are the mean of several
(ours, beyond the paper: a "model soup"). Meant for runs of one recipe continued from one start with different seeds:
each run's identity moves with its batches, and the mean keeps what they share. Every setting in the files (layout,
widths, α, β, start) must be the same; the output takes the first file's, and its training record lists the inputs
with their sha256.

Example (two runs of one recipe, then the mean scored like any file):
  boothkit average runs/a/instantbooth.safetensors runs/b/instantbooth.safetensors --output runs/ab.safetensors
  boothkit eval --methods base instantbooth --instantbooth runs/ab.safetensors
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .args import Parser


def parse_args(argv=None):
    p = Parser(prog="boothkit average", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help="InstantBooth files (two or more)")
    p.add_argument("--output", required=True, help="the averaged file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = p.parse_args(argv)
    if len(args.files) < 2:
        p.error(f"averaging needs two or more files, got {len(args.files)}")
    if len({Path(f).resolve() for f in args.files}) < len(args.files):
        p.error("a file is named twice: each input should be a different run")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..backend.files import refuse_existing
    from ..backend.instantbooth import average_instantbooth, load_instantbooth, save_instantbooth
    from ..toyworld.store import sha256_file

    out = refuse_existing(args.output, args.overwrite)  # before loading anything
    models = [load_instantbooth(f) for f in args.files]
    mean = average_instantbooth(models)
    mean.config.extra["averaged_from"] = [{"file": Path(f).name, "sha256": sha256_file(f)} for f in args.files]
    save_instantbooth(out, mean)
    print(f"wrote {out}: the mean of {len(models)} InstantBooth files")
    return 0
