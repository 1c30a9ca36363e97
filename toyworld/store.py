"""The toy world's shipped weights: every file is listed in ``weights/MANIFEST.json`` with its sha256,
and nothing is loaded before its hash is checked, so a corrupted or hand-edited file fails loudly."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = WEIGHTS_DIR / "MANIFEST.json"


class WeightsError(RuntimeError):
    """A shipped toy-world file is missing, or its content does not match the manifest."""

    __module__ = "boothkit"  # its name in ComfyUI's error dialog, whatever folder the pack is cloned into


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(manifest: Path) -> dict:
    if not manifest.exists():
        return {}
    return json.loads(manifest.read_text())


def record(paths, weights_dir: str | Path = WEIGHTS_DIR, reproduce: str | None = None) -> None:
    """Add or refresh the manifest entries of ``paths`` (files under ``weights_dir``).

    ``reproduce`` is the exact command that rebuilds these files; it is stored beside each hash."""
    weights_dir = Path(weights_dir)
    manifest = weights_dir / "MANIFEST.json"
    entries = _read_manifest(manifest)
    for p in paths:
        p = Path(p).resolve()
        rel = p.relative_to(weights_dir.resolve()).as_posix()
        entry = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        if reproduce:
            entry["reproduce"] = reproduce
        entries[rel] = entry
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(sorted(entries.items())), indent=2) + "\n")
    tmp.replace(manifest)


def verified(rel: str, weights_dir: str | Path = WEIGHTS_DIR) -> Path:
    """Path of a shipped file after checking its sha256 against the manifest."""
    weights_dir = Path(weights_dir)
    path = weights_dir / rel
    entries = _read_manifest(weights_dir / "MANIFEST.json")
    if rel not in entries:
        raise WeightsError(f"{path}: not listed in {weights_dir / 'MANIFEST.json'}; the toy world has not been "
                           f"trained yet or the manifest is stale (see README, 'Toy world').")
    if not path.exists():
        raise WeightsError(f"{path}: listed in the manifest but missing on disk.")
    found = sha256_file(path)
    if found != entries[rel]["sha256"]:
        raise WeightsError(f"{path}: sha256 {found} does not match the manifest's {entries[rel]['sha256']}; "
                           f"the file is corrupted or was changed without `record`.")
    return path


def verified_dir(rel_dir: str, weights_dir: str | Path = WEIGHTS_DIR) -> Path:
    """Check every manifest entry under ``rel_dir`` and return that folder (for diffusers/transformers folders)."""
    weights_dir = Path(weights_dir)
    entries = _read_manifest(weights_dir / "MANIFEST.json")
    prefix = rel_dir.rstrip("/") + "/"
    names = [k for k in entries if k.startswith(prefix)]
    if not names:
        raise WeightsError(f"{weights_dir / rel_dir}: no files listed in the manifest; the toy world has not been "
                           f"trained yet (see README, 'Toy world').")
    for name in names:
        verified(name, weights_dir)
    return weights_dir / rel_dir
