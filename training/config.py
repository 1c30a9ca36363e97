"""One configuration file (TOML or YAML) per run, with ``--set section.key=value`` overrides on the command line.
The fully resolved config is what gets saved with every checkpoint and in the output file's metadata."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

SECTIONS = ("model", "data", "method", "train")


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"{path}: config files are .toml or .yaml, got '{path.suffix}'")
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; expected {list(SECTIONS)}")
    return {k: dict(data.get(k, {})) for k in SECTIONS}


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``section.key=value``; the value is parsed as JSON when it can be (numbers, true/false, lists)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in SECTIONS or not name:
            raise ValueError(f"override {item!r} must look like section.key=value with section in {list(SECTIONS)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        config[section][name] = value
    return config


def build(cls, values: dict, where: str):
    """A settings dataclass from a config section; unknown keys are an error, not silently ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"[{where}] has unknown key(s) {sorted(unknown)}; known keys: {sorted(names)}")
    return cls(**values)
