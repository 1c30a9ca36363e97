"""`boothkit eval`: score methods on held-out toy-world identities (toyworld/evaluate.py), or compare two
methods subject by subject over existing tables (``--paired``)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..toyworld.evaluate import __doc__ as METRICS, evaluate, merge, paired, to_markdown
from . import threads
from .args import Parser, finite_float, fraction, int_range, learning_rate, nonneg_int


def parse_args(argv=None):
    from ..toyworld.methods import DEFAULT_METHODS, METHODS

    p = Parser(prog="boothkit eval", description=METRICS,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", help=f"any of: {', '.join(METHODS)} (default: "
                                                f"{' '.join(DEFAULT_METHODS)}, those that are trained)")
    p.add_argument("--subjects", type=int_range(1, 10_000), default=8, help="held-out identities to score")
    p.add_argument("--references", type=int_range(1, 64), default=3, help="reference images per subject")
    p.add_argument("--contexts", type=int_range(1, 256), default=4, help="prompts (contexts) per subject")
    p.add_argument("--samples", type=int_range(1, 64), default=2, help="images per prompt")
    p.add_argument("--steps", type=int_range(1, 1000), default=25, help="DDIM steps")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", default="out/eval", help="folder for eval.json and eval.md")
    p.add_argument("--beta", type=finite_float, help="InstantBooth's adapter weight β instead of the shipped file's")
    p.add_argument("--alpha", type=finite_float,
                   help="InstantBooth's concept-token weight α instead of the shipped file's")
    p.add_argument("--start-percent", type=fraction,
                   help="the share of sampling after which InstantBooth's adapters act (0: from the first step) "
                        "instead of the file's")
    p.add_argument("--adapters-on-uncond", choices=("yes", "no"),
                   help="InstantBooth's adapters on the unconditional half of guidance too (yes: files before "
                        "issue #30) or on the conditional half only (no), instead of the file's setting")
    p.add_argument("--instantbooth", metavar="FILE", help="an InstantBooth file instead of the shipped one")
    p.add_argument("--instantbooth-checks", action="store_true",
                   help="evaluate no method: run the cheap InstantBooth checks (toyworld/ib_checks.py: fixed-noise "
                        "loss per conditioning, adapter gains and residual norms, linear probes of the patch "
                        "tokens) on the shipped file or --instantbooth FILE, written to --out as checks.json/.md")
    p.add_argument("--context-draw", choices=("halves", "random"), default="halves",
                   help="halves (default): table and development contexts from disjoint halves of the domain's; "
                        "random: the draw of the tables written before issue #30, to --update them")
    p.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="train: score training identities (what the trainers saw), a memorisation check")
    p.add_argument("--e4t-lr", type=learning_rate, help="E4T's tune learning rate instead of the shipped file's")
    p.add_argument("--e4t", metavar="FILE", help="a pre-trained E4T file instead of the shipped one")
    p.add_argument("--dev", action="store_true",
                   help="score the last held-out identities instead of the first: a development set on which to "
                        "choose settings, disjoint from the table's subjects")
    p.add_argument("--update", action="store_true",
                   help="add the methods to the table already in --out (same settings), replacing their rows")
    p.add_argument("--paired", nargs=2, metavar=("A", "B"),
                   help="evaluate nothing: compare method A with B subject by subject over existing tables (--tables, "
                        "default --out's eval.json): the mean difference in identity and its standard error")
    p.add_argument("--pairs", action="store_true",
                   help="several concepts in one image: subjects 2i and 2i+1 side by side on a 32x64 canvas, each "
                        "half scored against its own and the other's references (own, other, swap margin, context; "
                        "toyworld/pairs.py), written to --out as pairs.json/.md/.png; methods as above, and "
                        "instantbooth-residual (one pass, adapters masked); default: "
                        "base instantbooth instantbooth-residual quicktune e4t-0 e4t-15")
    p.add_argument("--overwrite", action="store_true", help="replace the table already in --out")
    p.add_argument("--base-from", metavar="FILE",
                   help="take the base row (and so the ratios to it) from this eval.json, of the same subjects and "
                        "draw, instead of running the base model again (e.g. one --dev base table for many "
                        "--instantbooth / --beta runs)")
    p.add_argument("--tables", nargs="+", metavar="FILE", help="eval.json files for --paired (distinct subjects)")
    p.add_argument("--versus", nargs="+", metavar="FILE",
                   help="with --paired: read B from these eval.json files, one per --tables file, of the same "
                        "subjects and draw (the same method run two ways, e.g. two --instantbooth files)")
    threads.add_argument(p)
    args = p.parse_args(argv)
    if args.versus and not args.paired:
        p.error("--versus names the tables --paired reads B from; give --paired A B with it")
    if args.base_from and (args.update or args.paired or args.instantbooth_checks or args.pairs):
        p.error("--base-from goes with a new table, not with --update, --paired, --instantbooth-checks or --pairs")
    if args.pairs:
        clash = [f"--{n.replace('_', '-')}" for n in ("update", "paired", "instantbooth_checks") if getattr(args, n)]
        if clash or args.split != "heldout":
            p.error(f"--pairs writes its own table; it does not go with {', '.join(clash or ['--split train'])}")
        if args.subjects % 2:
            p.error(f"--pairs puts two subjects in each image; give an even --subjects, not {args.subjects}")
    return args


def read_table(path: Path) -> dict:
    """An eval.json, checked enough that --paired and --update fail on one line naming the file, not in the middle."""
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such table (write one with `boothkit eval --out FOLDER`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not an eval.json table ({e})") from None
    if not (isinstance(table, dict) and isinstance(table.get("settings"), dict)
            and isinstance(table.get("methods"), dict)
            and isinstance(table["settings"].get("subject_ids"), list)):
        raise ValueError(f"{path}: not an eval.json table; expected an object with 'settings' (with 'subject_ids') "
                         f"and 'methods'")
    for name, row in table["methods"].items():
        if not isinstance(row, dict):
            raise ValueError(f"{path}: method {name!r} is {str(row)[:40]!r}, expected an object of scores")
        per = row.get("identity_per_subject")
        if not (isinstance(per, list) and len(per) == len(table["settings"]["subject_ids"])
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in per)):
            raise ValueError(f"{path}: method {name!r} has no finite 'identity_per_subject' list, one number per "
                             f"subject")
    return table


def nonfinite_fields(obj, where="") -> list[str]:
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where or "(value)"]
    if isinstance(obj, dict):
        return [f for k, v in obj.items() for f in nonfinite_fields(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, list):
        return [f for i, v in enumerate(obj) for f in nonfinite_fields(v, f"{where}[{i}]")]
    return []


def main(argv=None) -> int:
    args = parse_args(argv)
    threads.apply(args.threads)
    if args.paired:
        tables = [read_table(Path(f)) for f in args.tables or [Path(args.out) / "eval.json"]]
        versus = [read_table(Path(f)) for f in args.versus] if args.versus else None
        r = paired(tables, *args.paired, versus=versus)
        a, b = r["a"], r["b"]
        if versus is not None:
            b += f" ({', '.join(args.versus)})"
        print(f"{a} against {b}, paired over {r['subjects']} subjects: identity {r['identity_a']:.3f} vs "
              f"{r['identity_b']:.3f}, difference {r['difference']:+.3f} ± {r['difference_se']:.3f} (standard error), "
              f"{a} above on {r['a_above']}")
        if "context_difference" in r:
            print(f"context margin {r['context_a']:.4f} vs {r['context_b']:.4f}, difference "
                  f"{r['context_difference']:+.4f} ± {r['context_difference_se']:.4f} (standard error)")
        print(json.dumps(r))
        return 0
    if args.instantbooth_checks:
        from ..toyworld.ib_checks import checks_markdown, run_checks
        from ..toyworld.methods import ToyEnv

        env = ToyEnv.load(sample_steps=args.steps)
        if args.instantbooth:
            from ..backend.instantbooth import load_instantbooth

            env.instantbooth = load_instantbooth(args.instantbooth, family="toy", ctx_dim=env.base.ctx_dim).eval()
            env.instantbooth.config.extra["file"] = str(args.instantbooth)
        ib = env.instantbooth
        for key in ("beta", "alpha", "start_percent"):
            if getattr(args, key) is not None:
                setattr(ib.config, key, getattr(args, key))
        if args.adapters_on_uncond is not None:
            ib.config.adapters_on_uncond = args.adapters_on_uncond == "yes"
        print(checks_markdown(run_checks(env, ib, Path(args.out), args.seed)))
        return 0
    if args.pairs:
        return main_pairs(args)
    out = Path(args.out)
    table = out / "eval.json"
    # checked before the evaluation, not after it: the folder, the table to update, a table not to replace
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for eval.json and eval.md")
    old = None
    if args.update and table.exists():
        old = read_table(table)
    elif table.exists() and not args.overwrite:
        raise FileExistsError(f"{table} exists; pass --update to add rows to it, --overwrite to replace it, or "
                              f"choose another --out")
    base = read_table(Path(args.base_from)) if args.base_from else None
    result = evaluate(args.methods, args.subjects, args.references, args.contexts, args.samples, args.seed,
                      args.steps, {"beta": args.beta, "alpha": args.alpha, "start_percent": args.start_percent,
                                   "instantbooth": args.instantbooth,
                                   "adapters_on_uncond": None if args.adapters_on_uncond is None else
                                   args.adapters_on_uncond == "yes", "e4t_lr": args.e4t_lr, "e4t": args.e4t},
                      args.dev, args.split, args.context_draw, None if base is None else (base, args.base_from))
    if old is not None:
        result = merge(old, result)
    write_tables(table, result, to_markdown, "nothing written (check --beta / --e4t-lr / --e4t)")
    return 0


def main_pairs(args) -> int:
    from ..toyworld.pairs import evaluate_pairs, pairs_markdown

    out = Path(args.out)
    table = out / "pairs.json"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for pairs.json, pairs.md and pairs.png")
    if table.exists() and not args.overwrite:
        raise FileExistsError(f"{table} exists; pass --overwrite to replace it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate_pairs(args.methods, args.subjects, args.references, args.contexts, args.samples, args.seed,
                            args.steps, args.dev, args.context_draw, picture=out / "pairs.png")
    # its picture was written while it ran
    write_tables(table, result, pairs_markdown, "no table written", also=[out / "pairs.png"])
    return 0


def write_tables(table: Path, result: dict, markdown, unwritten: str, also=()) -> None:
    """``table`` (JSON) and its markdown beside it, after checking every score is finite (``unwritten``: what the
    error says of the files then); prints the markdown and the files written."""
    bad = nonfinite_fields(result)
    if bad:
        raise ValueError(f"the evaluation produced non-finite scores ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); {unwritten}")
    table.parent.mkdir(parents=True, exist_ok=True)
    write_text(table, json.dumps(result, indent=2, allow_nan=False) + "\n")
    md = markdown(result)
    write_text(table.with_suffix(".md"), md)
    print(md)
    files = [table, table.with_suffix(".md"), *also]
    print(f"wrote {', '.join(map(str, files[:-1]))} and {files[-1]}")


def write_text(path: Path, text: str) -> None:
    """Atomically (temp file + rename), so an interrupted write never leaves half a table."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
