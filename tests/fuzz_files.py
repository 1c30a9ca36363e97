"""Metadata fuzzing of the shipped toy-world files, run as a subprocess by tests/test_robustness.py under a memory
limit: ``python -m ... fuzz_files.py OUT_DIR LIMIT_MB``.

Each mutation changes one metadata value of instantbooth.safetensors or e4t.safetensors (a top-level field, or one
number inside the JSON fields ``layout`` / ``config``), writes the file, and loads it with the backend loader. A load
must either succeed or raise ValueError (FormatError) whose message starts with the file's path; anything else
(MemoryError, a torch allocation error, a TypeError traceback) is a failure. The address space is capped at the
interpreter's size after imports plus LIMIT_MB, so a loader that tries to build a module from a lying dimension
fails instead of allocating. Prints one JSON line: {"tried": N, "loaded": N, "refused": N, "failures": [...]}."""
from __future__ import annotations

import json
import random
import resource
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)

from boothkit.backend.e4t import load_e4t  # noqa: E402
from boothkit.backend.instantbooth import load_instantbooth  # noqa: E402
from boothkit.toyworld.store import verified  # noqa: E402

TOP_VALUES = ["-1", "65536", "1e7", "nan", "", "[]"]
LEAF_VALUES = [0, -1, 65536, 4096, 1e308, None, "x", [], 2 ** 62]


def vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def leaves(obj, path=()):
    """Paths of the numbers (and short lists of numbers) in a JSON tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):  # the first few items of each list: the rest are alike
            yield from leaves(v, path + (i,))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path


def set_leaf(obj, path, value):
    obj = json.loads(json.dumps(obj))
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return obj


def mutations(meta: dict[str, str], json_field: str, rng: random.Random, max_leaf: int):
    for key in sorted(meta):
        if key in ("training",):
            continue
        for v in TOP_VALUES:
            yield key, v, {**meta, key: v}
    tree = json.loads(meta[json_field])
    paths = list(leaves(tree))
    rng.shuffle(paths)
    for path in paths[:max_leaf]:
        for v in LEAF_VALUES:
            yield f"{json_field}{list(path)}", v, {**meta, json_field: json.dumps(set_leaf(tree, path, v))}


def main(out: str, limit_mb: int, max_leaf: int = 8) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = [(verified("instantbooth.safetensors"), "layout", lambda p: load_instantbooth(p, family="toy")),
               (verified("e4t.safetensors"), "config", lambda p: load_e4t(p, family="toy"))]
    rng = random.Random(0)
    load_instantbooth(sources[0][0], family="toy")  # warm up (imports, the meta device's first use)
    load_e4t(sources[1][0], family="toy")
    limit = vm_bytes() + limit_mb * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    tried = loaded = refused = 0
    failures = []
    for src, json_field, loader in sources:
        tensors = load_file(str(src))
        from safetensors import safe_open

        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata()
        path = out / f"mutated_{src.stem}.safetensors"
        for field, value, mutated in mutations(meta, json_field, rng, max_leaf):
            tried += 1
            save_file(tensors, str(path), metadata=mutated)
            try:
                loader(path)
                loaded += 1
            except ValueError as e:
                if not str(e).startswith(str(path)) or "\n" in str(e):
                    failures.append(f"{src.name} {field}={value!r}: message {str(e)[:200]!r}")
                refused += 1
            except BaseException as e:  # noqa: BLE001 - every other exception is the failure being looked for
                failures.append(f"{src.name} {field}={value!r}: {type(e).__name__}: {str(e)[:200]}")
    print(json.dumps({"tried": tried, "loaded": loaded, "refused": refused, "failures": failures,
                      "limit_mb": limit_mb}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *(int(a) for a in sys.argv[3:]))
