"""One configuration file (TOML or YAML) per run, with ``--set section.key=value`` overrides on the command line.
The fully resolved config is what gets saved with every checkpoint and in the output file's metadata."""
from __future__ import annotations

import dataclasses
import json
import math
import typing
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
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        check_value(where, key, value, hints.get(key))
    return cls(**values)


SIGNED = {"background"}  # the only numeric settings that may be negative


def check_value(where: str, key: str, value, hint) -> None:
    """A config value of the type its dataclass field declares; numbers finite, non-negative (except SIGNED), and
    learning rates positive: ``--set method.lr_heads=NaN`` is refused before any model is loaded."""
    name = f"[{where}] {key}"
    origin = typing.get_origin(hint)
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise ValueError(f"{name} is {value!r}, expected a {origin.__name__}")
        return
    args = set(typing.get_args(hint)) or {hint}
    if value is None and type(None) in args:
        return
    if (int in args or float in args) and not isinstance(value, bool) and isinstance(value, (int, float)):
        if float not in args and not isinstance(value, int):
            raise ValueError(f"{name} is {value!r}, expected an integer")
        if not math.isfinite(value):
            raise ValueError(f"{name} is {value!r}, expected a finite number")
        if value < 0 and key not in SIGNED:
            raise ValueError(f"{name} is {value!r}, expected a number >= 0")
        # 0 freezes a parameter group (e.g. lr_heads = 0 trains the adapters alone); above 10 Adam overflows
        if (key == "lr" or key.startswith("lr_") or key.endswith("_lr")) and not 0 <= value <= 10:
            raise ValueError(f"{name} is {value!r}, expected a learning rate with 0 <= lr <= 10")
        return
    if int in args or float in args:
        raise ValueError(f"{name} is {value!r}, expected a number")
    if bool in args and not isinstance(value, bool):
        raise ValueError(f"{name} is {value!r}, expected true or false")
    if str in args and not isinstance(value, str):
        raise ValueError(f"{name} is {value!r}, expected a string")
