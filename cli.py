"""The ``boothkit`` command. Each subcommand lives in its own module with a ``main(argv)``; nothing heavy is imported
until a subcommand runs."""
from __future__ import annotations

import importlib
import logging
import sys

COMMANDS = {
    # name: (module relative to the package, one-line help)
    "demo": (".toyworld.demo", "personalize a held-out toy-world subject and write a PNG grid (no arguments needed)"),
    "generate": (".hosts.generate", "text-to-image with InstantBooth on a diffusers model from image(s) + prompt"),
    "eval": (".toyworld.evaluate", "score every method on held-out toy-world identities; writes JSON and Markdown"),
    "train": (".training.cli", "train a method: `boothkit train instantbooth|e4t --config FILE`"),
    "tune": (".training.tune_cli", "two-stage quick-tune (textual inversion, then LoRA) on a folder of images"),
    "bench": (".bench", "benchmarks: `boothkit bench overhead|train|tune|comfy-overhead`"),
    "toyworld": (".toyworld.cli", "toy-world utilities: export a dataset folder, train the toy base model"),
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
    except (ValueError, FileNotFoundError, WeightsError, TrainingStopped) as e:  # one clear line, no traceback
        print(f"boothkit {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
