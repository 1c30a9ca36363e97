"""`boothkit eval`: score methods on held-out toy-world identities (toyworld/evaluate.py), or compare two
methods subject by subject over existing tables (``--paired``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..toyworld.evaluate import __doc__ as METRICS, evaluate, merge, paired, to_markdown


def parse_args(argv=None):
    from ..toyworld.methods import DEFAULT_METHODS, METHODS

    p = argparse.ArgumentParser(prog="boothkit eval", description=METRICS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", help=f"any of: {', '.join(METHODS)} (default: "
                                                f"{' '.join(DEFAULT_METHODS)}, those that are trained)")
    p.add_argument("--subjects", type=int, default=8, help="held-out identities to score")
    p.add_argument("--references", type=int, default=3, help="reference images per subject")
    p.add_argument("--contexts", type=int, default=4, help="prompts (contexts) per subject")
    p.add_argument("--samples", type=int, default=2, help="images per prompt")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/eval", help="folder for eval.json and eval.md")
    p.add_argument("--beta", type=float, help="InstantBooth's adapter weight β instead of the shipped file's")
    p.add_argument("--e4t-lr", type=float, help="E4T's tune learning rate instead of the shipped file's")
    p.add_argument("--e4t", metavar="FILE", help="a pre-trained E4T file instead of the shipped one")
    p.add_argument("--dev", action="store_true",
                   help="score the last held-out identities instead of the first: a development set on which to "
                        "choose settings, disjoint from the table's subjects")
    p.add_argument("--update", action="store_true",
                   help="add the methods to the table already in --out (same settings), replacing their rows")
    p.add_argument("--paired", nargs=2, metavar=("A", "B"),
                   help="evaluate nothing: compare method A with B subject by subject over existing tables (--tables, "
                        "default --out's eval.json): the mean difference in identity and its standard error")
    p.add_argument("--tables", nargs="+", metavar="FILE", help="eval.json files for --paired (distinct subjects)")
    from . import threads

    threads.add_argument(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from . import threads

    threads.apply(args.threads)
    if args.paired:
        tables = [json.loads(Path(f).read_text()) for f in args.tables or [Path(args.out) / "eval.json"]]
        r = paired(tables, *args.paired)
        print(f"{r['a']} against {r['b']}, paired over {r['subjects']} subjects: identity {r['identity_a']:.3f} vs "
              f"{r['identity_b']:.3f}, difference {r['difference']:+.3f} ± {r['difference_se']:.3f} (standard error), "
              f"{r['a']} above on {r['a_above']}")
        print(json.dumps(r))
        return 0
    result = evaluate(args.methods, args.subjects, args.references, args.contexts, args.samples, args.seed,
                      args.steps, {"beta": args.beta, "e4t_lr": args.e4t_lr, "e4t": args.e4t}, args.dev)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.update and (out / "eval.json").exists():
        result = merge(json.loads((out / "eval.json").read_text()), result)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    (out / "eval.md").write_text(md)
    print(md)
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0
