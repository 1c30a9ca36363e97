"""`boothkit toyworld ...`: utilities around the toy world.

  export   write a dataset folder (NNNNN.png, NNNNN.txt caption, NNNNN_mask.png, metadata.jsonl with identities)
           that `boothkit train` reads like any user's folder
  verify   check every shipped toy-world file against its sha256 in weights/MANIFEST.json
"""
from __future__ import annotations

import argparse

from .args import Parser, int_range, nonneg_int


def parse_args(argv=None):
    p = Parser(prog="boothkit toyworld", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a dataset folder")
    e.add_argument("--split", choices=["train", "heldout"], default="train")
    e.add_argument("--n", type=int_range(1, 10_000_000), default=20000, help="number of samples")
    e.add_argument("--seed", type=nonneg_int, default=0)
    e.add_argument("--out", required=True)
    sub.add_parser("verify", help="check the shipped weights' sha256")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "export":
        from ..toyworld.domain import export_folder

        export_folder(args.split, args.n, args.out, args.seed)
        print(f"wrote {args.n} {args.split} samples to {args.out}")
    elif args.command == "verify":
        import json

        from ..toyworld.store import MANIFEST, verified

        names = list(json.loads(MANIFEST.read_text())) if MANIFEST.exists() else []
        for name in names:
            verified(name)
        print(f"{len(names)} files match {MANIFEST}")
    return 0
