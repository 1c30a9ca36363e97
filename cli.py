"""The ``boothkit`` command. Each subcommand lives in its own module with a ``main(argv)``; nothing heavy is imported
until a subcommand runs."""
from __future__ import annotations

import importlib
import logging
import sys

COMMANDS = {
    # name: (module relative to the package, one-line help)
    "demo": (".commands.demo", "E4T and InstantBooth side by side on a held-out toy-world subject: a labelled PNG "
                               "grid (no arguments needed)"),
    "generate": (".commands.generate", "text-to-image with any method's files (InstantBooth photos, embedding, LoRA, E4T "
                                       "concept); the toy world by default"),
    "eval": (".commands.eval", "score methods on held-out toy-world identities (JSON + Markdown), or compare two over tables"),
    "train": (".commands.train", "train a method: `boothkit train instantbooth|e4t --config FILE`"),
    "average": (".commands.average", "one InstantBooth file from the mean of several runs' weights (a model soup)"),
    "tune": (".commands.tune", "personalize from photos: quick-tune (embedding + LoRA) or E4T (`--method e4t`); prints "
                               "the generate command"),
    "bench": (".commands.bench", "benchmarks: `boothkit bench --help` lists them (overhead, train, tune, e4t, comfy-*)"),
    "toyworld": (".commands.toyworld", "toy-world utilities: export a dataset or one identity's photos, list identities, "
                                       "verify the weights"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: boothkit COMMAND [ARGS]  (boothkit COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"boothkit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = importlib.import_module(COMMANDS[name][0], package=__package__)
    from .toyworld.store import WeightsError
    from .training.trainer import TrainingStopped

    try:
        return int(module.main(rest) or 0)
    except (ValueError, OSError, WeightsError, TrainingStopped) as e:  # one clear line, no traceback
        # OSError: a file where a folder goes, an output that exists, no permission; its text names the path
        print(f"boothkit {name}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
