"""`boothkit toyworld ...`: utilities around the toy world.

  export      write a dataset folder (NNNNN.png, NNNNN.txt caption, NNNNN_mask.png, metadata.jsonl with identities)
              that `boothkit train` reads like any user's folder: --split train (the identities the base model and
              the encoders learnt from) or heldout (the identities no trainer has seen: evaluation only); with
              --identity ID the photos of that one subject, the folder `boothkit tune --images` takes
  identities  list the identities (id, split, class, what they look like), e.g. to pick an --identity
  verify      check every shipped toy-world file against its sha256 in weights/MANIFEST.json

Example: a held-out cat's photos, tuned on, then sampled:
  boothkit toyworld export --identity 1000 --out photos
  boothkit tune --images photos --class-noun cat --out tuned
"""
from __future__ import annotations

import argparse
import sys

from .args import Parser, int_range, nonneg_int


def parse_args(argv=None):
    p = Parser(prog="boothkit toyworld", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a dataset folder (a split, or one identity's photos)")
    e.add_argument("--split", choices=["train", "heldout", "encoder", "encoder_all"], default="train",
                   help="train (default): identities the trainers use; heldout: identities kept for evaluation; "
                        "encoder: train plus 4000 identities only the personalization encoders train on; "
                        "encoder_all: every identity but the held-out ones (13408)")
    e.add_argument("--identity", type=nonneg_int,
                   help="photos of this one identity only (`boothkit toyworld identities` lists the ids); its split "
                        "is the id's")
    e.add_argument("--n", type=int_range(1, 10_000_000), help="number of samples (default 20000; 5 with --identity)")
    e.add_argument("--seed", type=nonneg_int, default=0)
    e.add_argument("--out", required=True)
    ls = sub.add_parser("identities", help="list the identities")
    ls.add_argument("--split", choices=["train", "heldout", "all"], default="heldout",
                    help="which identities (default heldout: the subjects to try methods on)")
    sub.add_parser("verify", help="check the shipped weights' sha256")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    if args.command == "export" and args.identity is not None and any(a.startswith("--split") for a in given):
        p.error("--identity ID exports one identity, whose split is the id's; leave out --split")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "export":
        from ..toyworld.domain import export_folder, identity_by_id, split_of

        if args.identity is not None:
            ident = identity_by_id(args.identity)  # an unknown id fails before anything is written
            n = args.n or 5
            export_folder("train", n, args.out, args.seed, identity_id=ident.id)
            print(f"wrote {n} photos of {split_of(ident.id)} {ident.class_name} #{ident.id} to {args.out}")
        else:
            n = args.n or 20000
            export_folder(args.split, n, args.out, args.seed)
            print(f"wrote {n} {args.split} samples to {args.out}")
    elif args.command == "identities":
        from ..toyworld.domain import describe, identities

        splits = ["train", "heldout"] if args.split == "all" else [args.split]
        for split in splits:
            for ident in identities(split):
                print(f"{ident.id:5d}  {split:7s}  {ident.class_name:5s}  {describe(ident)}")
    elif args.command == "verify":
        import json

        from ..toyworld.store import MANIFEST, verified

        names = list(json.loads(MANIFEST.read_text())) if MANIFEST.exists() else []
        for name in names:
            verified(name)
        print(f"{len(names)} files match {MANIFEST}")
    return 0
