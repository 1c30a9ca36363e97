"""The toy world: a procedural, seed-deterministic image domain that stands in for "photos of a subject".

Subjects belong to a few classes (class nouns, like the papers' *person*/*cat*). An **identity** is a fixed
combination of details that no word in the vocabulary can express — body and secondary colour, a coarse pattern
(2-px stripes, dots, checker), which colour the head takes, eye colour and a class-specific part shape (ear shape for
cats, antenna for robots). Each render varies pose (flip, tilt), position, scale, background, lighting and an optional
context object, from a seed. Captions name only the class and the context ("a photo of a cat on grass at night with a
ball"), never an identity attribute, so a text-to-image base model trained on them learns the classes and contexts but
cannot reproduce one specific identity from text alone — that is what personalization must add.

Identities are split: TRAIN identities (base model, encoders, scorers) and HELD-OUT identities (evaluation only),
disjoint attribute combinations drawn from a fixed shuffle.

Rendering is vectorised numpy at 2× supersampling, then box-downsampled to 32×32 (soft edges, masks by coverage).
"""
from __future__ import annotations

import itertools
import json
import random as _random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

RESOLUTION = 32
_SS = 2  # supersampling factor
_N = RESOLUTION * _SS

CLASS_NOUNS: dict[str, list[str]] = {"cat": ["cat", "kitten"], "robot": ["robot", "droid"]}
CLASSES: tuple[str, ...] = tuple(CLASS_NOUNS)
IDENTIFIER = "sks"
# Further rare words (single tokens, never in base captions) for methods that need more than one identifier.
RARE_WORDS: tuple[str, ...] = ("sks", "zwx", "vvk")

BACKGROUNDS: tuple[str, ...] = ("grass", "sand", "snow", "water", "road")
LIGHTS: tuple[str, ...] = ("day", "night")
OBJECTS: tuple[str, ...] = ("ball", "tree", "box", "flower")

TEMPLATES: tuple[str, ...] = ("a photo of a {}", "a picture of a {}", "a {}")
CANONICAL_TEMPLATE = TEMPLATES[0]

# Identity attribute values (never words in captions).
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.20, 0.15),  # red
    (0.95, 0.55, 0.10),  # orange
    (0.95, 0.85, 0.15),  # yellow
    (0.20, 0.45, 0.95),  # blue
    (0.60, 0.25, 0.80),  # purple
    (0.95, 0.45, 0.70),  # pink
    (0.10, 0.10, 0.12),  # black
    (0.96, 0.96, 0.94),  # white
)
PATTERNS: tuple[str, ...] = ("solid", "hstripes", "vstripes", "dots", "checker")
HEAD_LAYOUTS: tuple[str, ...] = ("primary", "secondary")
EYE_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.10, 0.90, 0.20), (0.10, 0.80, 0.95), (0.95, 0.10, 0.10), (1.00, 0.95, 0.10))
PARTS: dict[str, tuple[str, ...]] = {"cat": ("pointy", "round", "tall"), "robot": ("single", "double", "dish")}

N_TRAIN_PER_CLASS = 160
N_HELDOUT_PER_CLASS = 16
HELDOUT_ID_OFFSET = 1000
# More identities for the personalization encoders alone (InstantBooth, E4T): the base model, the scorers and the
# evaluation never see them. The papers' encoders train on far more subjects than a base model's fine-tuning set.
N_EXTRA_PER_CLASS = 2000
EXTRA_ID_OFFSET = 2000
_SPLIT_SEED = 20240511

VOCAB: list[str] = sorted(set(
    " ".join(TEMPLATES).replace("{}", " ").split()
    + [w for nouns in CLASS_NOUNS.values() for w in nouns]
    + list(RARE_WORDS) + list(BACKGROUNDS) + list(LIGHTS) + list(OBJECTS)
    + ["on", "at", "with", "the"]))

# Words a caption must never contain: the ones that would describe an identity.
IDENTITY_WORDS: frozenset[str] = frozenset(
    ["red", "orange", "yellow", "blue", "purple", "pink", "black", "white", "green", "striped", "stripes", "dots",
     "dotted", "checker", "checkered", "solid", "pointy", "round", "tall", "single", "double", "dish", "antenna",
     "ears", "eyes"])


@dataclass(frozen=True)
class Identity:
    id: int
    class_name: str
    primary: int        # index into PALETTE: body colour
    secondary: int      # index into PALETTE: pattern colour (and the head's, when head == "secondary")
    pattern: str        # PATTERNS
    head: str           # HEAD_LAYOUTS: which colour the head takes
    eye: int            # index into EYE_COLORS
    part: str           # PARTS[class_name]: ear shape (cat) or antenna (robot)

    @property
    def attributes(self) -> tuple:
        return (self.class_name, self.primary, self.secondary, self.pattern, self.head, self.eye, self.part)


@dataclass(frozen=True)
class Context:
    background: str
    light: str
    obj: str | None


@dataclass
class Sample:
    image: torch.Tensor     # [3,R,R] float in [0,1]
    mask: torch.Tensor      # [1,R,R] float {0,1}: the subject
    caption: str
    identity: Identity
    context: Context


# ----------------------------------------------------------------------------------------------------------------
# identities and captions


@lru_cache(maxsize=None)
def _splits() -> dict[str, tuple[Identity, ...]]:
    rng = np.random.default_rng(_SPLIT_SEED)
    train, heldout, extra, rest = [], [], [], []
    for cls in CLASSES:
        combos = list(itertools.product(range(len(PALETTE)), range(len(PALETTE)), PATTERNS, HEAD_LAYOUTS,
                                        range(len(EYE_COLORS)), PARTS[cls]))
        combos = [c for c in combos if c[0] != c[1]]
        order = rng.permutation(len(combos))
        picked = [combos[i] for i in order[:N_HELDOUT_PER_CLASS + N_TRAIN_PER_CLASS]]
        heldout += [(cls, c) for c in picked[:N_HELDOUT_PER_CLASS]]
        train += [(cls, c) for c in picked[N_HELDOUT_PER_CLASS:]]
        # the combinations after those in the same shuffle: disjoint from both, and train/heldout stay as they were
        start = N_HELDOUT_PER_CLASS + N_TRAIN_PER_CLASS
        extra += [(cls, combos[i]) for i in order[start:start + N_EXTRA_PER_CLASS]]
        rest += [(cls, combos[i]) for i in order[start + N_EXTRA_PER_CLASS:]]
    mk = lambda i, cls, c: Identity(i, cls, c[0], c[1], c[2], c[3], c[4], c[5])  # noqa: E731
    splits = {"train": tuple(mk(i, cls, c) for i, (cls, c) in enumerate(train)),
              "heldout": tuple(mk(HELDOUT_ID_OFFSET + i, cls, c) for i, (cls, c) in enumerate(heldout)),
              "extra": tuple(mk(EXTRA_ID_OFFSET + i, cls, c) for i, (cls, c) in enumerate(extra))}
    # every other combination, ids after the extra ones: "encoder_all" is the whole space but the held-out identities
    offset = EXTRA_ID_OFFSET + len(extra)
    splits["rest"] = tuple(mk(offset + i, cls, c) for i, (cls, c) in enumerate(rest))
    splits["encoder"] = splits["train"] + splits["extra"]  # what an encoder may train on
    splits["encoder_all"] = splits["encoder"] + splits["rest"]
    return splits


def identities(split: str) -> list[Identity]:
    """The identities of ``split`` ("train", "heldout", "extra", "encoder" = train + extra, "rest" = every other
    combination, "encoder_all" = encoder + rest); same list on every call and machine. Train ids are 0..N-1 (usable
    as class labels); held-out ids start at ``HELDOUT_ID_OFFSET``, the encoders' extra ones at ``EXTRA_ID_OFFSET``."""
    splits = _splits()
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(splits)}")
    return list(splits[split])


def identity_by_id(identity_id: int) -> Identity:
    for split in ("train", "heldout", "extra", "rest"):
        for ident in _splits()[split]:
            if ident.id == identity_id:
                return ident
    tr, ho = _splits()["train"], _splits()["heldout"]
    raise ValueError(f"no toy-world identity with id {identity_id}; train ids are {tr[0].id}..{tr[-1].id}, held-out "
                     f"ids {ho[0].id}..{ho[-1].id} (`boothkit toyworld identities` lists them)")


def _choice(rng, seq):
    """Pick from ``seq`` with a numpy Generator or a ``random.Random`` (both are used by callers)."""
    if isinstance(rng, np.random.Generator):
        return seq[int(rng.integers(len(seq)))]
    return seq[rng.randrange(len(seq))]


def _uniform(rng) -> float:
    return float(rng.random())


def random_context(rng) -> Context:
    """A uniformly random context; ``rng`` is a ``numpy.random.Generator`` or a ``random.Random``."""
    bg = _choice(rng, BACKGROUNDS)
    light = _choice(rng, LIGHTS)
    obj = _choice(rng, (None,) + OBJECTS)
    return Context(bg, light, obj)


def one_field_changes(context: Context) -> list[Context]:
    """Every context that differs from ``context`` in exactly one field (background, light or object)."""
    out = [Context(b, context.light, context.obj) for b in BACKGROUNDS if b != context.background]
    out += [Context(context.background, li, context.obj) for li in LIGHTS if li != context.light]
    out += [Context(context.background, context.light, o) for o in (None, *OBJECTS) if o != context.obj]
    return out


def _context_words(context: Context) -> str:
    if context.background not in BACKGROUNDS or context.light not in LIGHTS or \
            (context.obj is not None and context.obj not in OBJECTS):
        raise ValueError(f"invalid context {context}; expected background in {BACKGROUNDS}, light in {LIGHTS}, "
                         f"obj None or in {OBJECTS}")
    text = f"on {context.background} at {context.light}"
    if context.obj is not None:
        text += f" with a {context.obj}"
    return text


def caption(class_name: str, context: Context, *, noun: str | None = None, identifier: str | None = None,
            rng=None) -> str:
    """A caption naming the class and the context, never the identity.

    ``rng`` (numpy Generator or random.Random) picks the template and the noun among the class nouns; without it the
    canonical template and the first noun are used. ``identifier`` goes right before the class noun
    ("a photo of a sks cat on grass at day")."""
    if class_name not in CLASS_NOUNS:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASSES}")
    template = CANONICAL_TEMPLATE
    if noun is None:
        noun = CLASS_NOUNS[class_name][0]
        if rng is not None:
            noun = _choice(rng, CLASS_NOUNS[class_name])
    if rng is not None:
        template = _choice(rng, TEMPLATES)
    subject = f"{identifier} {noun}" if identifier else noun
    return template.format(f"{subject} {_context_words(context)}")


def unknown_words(prompt: str, allowed=()) -> list[str]:
    """Words of ``prompt`` the toy world's captions never use (the toy base reads them as noise), in order; the
    ``allowed`` words (an identifier) are left out."""
    skip = set(VOCAB) | {w.lower() for w in allowed}
    out = []
    for w in re.findall(r"[a-z0-9_'\-]+", prompt.lower()):
        if w not in skip and w not in out:
            out.append(w)
    return out


def vocabulary_summary() -> str:
    nouns = ", ".join(n for ns in CLASS_NOUNS.values() for n in ns)
    return (f"subjects {nouns}; backgrounds {', '.join(BACKGROUNDS)}; light {', '.join(LIGHTS)}; objects "
            f"{', '.join(OBJECTS)}; as in 'a photo of a sks cat on snow at night with a ball'")


def context_prompt(class_name: str, context: Context) -> str:
    """The canonical caption without identity (for alignment scoring)."""
    return caption(class_name, context)


# ----------------------------------------------------------------------------------------------------------------
# rendering (numpy, supersampled)

_BG_COLORS = {
    "grass": (0.25, 0.55, 0.18), "sand": (0.86, 0.76, 0.52), "snow": (0.93, 0.95, 0.98),
    "water": (0.12, 0.38, 0.72), "road": (0.33, 0.33, 0.35),
}
_SKY_DAY = np.array((0.55, 0.78, 0.98))
_SKY_NIGHT = np.array((0.03, 0.04, 0.12))

_grid = (np.arange(_N) + 0.5) / _SS  # pixel centres in output-pixel units
_YY, _XX = np.meshgrid(_grid, _grid, indexing="ij")


def _col(c) -> np.ndarray:
    return np.asarray(c, dtype=np.float32)


def _paint(img: np.ndarray, mask: np.ndarray, color) -> None:
    img[mask] = _col(color)


def _background(bg: str, horizon: float, rng: np.random.Generator, night: bool) -> np.ndarray:
    img = np.empty((_N, _N, 3), np.float32)
    ground = _YY >= horizon
    img[:] = _SKY_NIGHT if night else _SKY_DAY
    base = _col(_BG_COLORS[bg])
    noise = rng.normal(0, 1, (RESOLUTION, RESOLUTION)).astype(np.float32).repeat(_SS, 0).repeat(_SS, 1)
    tex = np.broadcast_to(base, img.shape).copy()
    phase = rng.uniform(0, 6.3)
    if bg == "grass":
        blades = (np.sin(_XX * 2.6 + phase + 0.7 * np.sin(_YY)) > 0.3)
        tex[blades] *= _col((0.75, 0.85, 0.7))
        tex += 0.05 * noise[..., None]
    elif bg == "sand":
        tex += 0.05 * noise[..., None]
        tex[noise > 1.6] = _col((0.68, 0.55, 0.33))
    elif bg == "snow":
        tex += 0.02 * noise[..., None]
        tex[noise > 1.8] = _col((0.78, 0.85, 0.95))
    elif bg == "water":
        waves = np.sin(_YY * 1.9 + 1.2 * np.sin(_XX * 0.5 + phase)) > 0.75
        tex[waves] = _col((0.55, 0.75, 0.95))
        tex += 0.03 * noise[..., None]
    elif bg == "road":
        tex += 0.03 * noise[..., None]
        lane_y = horizon + (RESOLUTION - horizon) * 0.6
        dash = (np.abs(_YY - lane_y) < 0.7) & ((_XX + phase * 3) % 8 < 4.5)
        tex[dash] = _col((0.95, 0.95, 0.90))
    img[ground] = tex[ground]
    return img


def _disk(cx, cy, r):
    return (_XX - cx) ** 2 + (_YY - cy) ** 2 <= r * r


def _draw_object(img: np.ndarray, obj: str, cx: float, ground_y: float, size: float) -> None:
    """Context objects in image coordinates, standing on ``ground_y``; fixed colours (not identity details)."""
    s = size
    if obj == "ball":
        r = 0.32 * s
        cy = ground_y - r
        d = _disk(cx, cy, r)
        _paint(img, d, (0.95, 0.45, 0.05))
        _paint(img, d & (np.abs(_YY - cy) < 0.25 * r), (0.98, 0.98, 0.98))
    elif obj == "tree":
        trunk = (np.abs(_XX - cx) <= 0.09 * s) & (_YY <= ground_y) & (_YY >= ground_y - 0.55 * s)
        _paint(img, trunk, (0.42, 0.25, 0.10))
        crown = _disk(cx, ground_y - 0.75 * s, 0.34 * s)
        _paint(img, crown, (0.05, 0.30, 0.08))
        _paint(img, crown & ~_disk(cx, ground_y - 0.75 * s, 0.26 * s), (0.02, 0.18, 0.04))
    elif obj == "box":
        h = 0.30 * s
        box = (np.abs(_XX - cx) <= h) & (_YY <= ground_y) & (_YY >= ground_y - 2 * h)
        _paint(img, box, (0.62, 0.42, 0.20))
        inner = (np.abs(_XX - cx) <= h - 0.6) & (_YY <= ground_y - 0.6) & (_YY >= ground_y - 2 * h + 0.6)
        edge = box & ~inner
        _paint(img, edge, (0.35, 0.22, 0.08))
        _paint(img, box & (np.abs(_XX - cx) < 0.35), (0.85, 0.75, 0.55))  # tape
    elif obj == "flower":
        stem = (np.abs(_XX - cx) <= 0.05 * s + 0.3) & (_YY <= ground_y) & (_YY >= ground_y - 0.6 * s)
        _paint(img, stem, (0.1, 0.6, 0.1))
        fy = ground_y - 0.65 * s
        for k in range(5):
            a = 2 * np.pi * k / 5
            _paint(img, _disk(cx + 0.15 * s * np.cos(a), fy + 0.15 * s * np.sin(a), 0.1 * s), (0.95, 0.3, 0.75))
        _paint(img, _disk(cx, fy, 0.08 * s), (1.0, 0.9, 0.1))
    else:
        raise ValueError(f"unknown context object {obj!r}; expected one of {OBJECTS}")


def _subject(identity: Identity, cx: float, cy: float, scale: float, flip: bool, tilt: float):
    """Colour [N,N,3] and coverage [N,N] (bool) of the subject, drawn in local coordinates ``(u, v)`` where the
    subject spans about [-1, 1] and v points down; the pattern moves with the body."""
    cos, sin = np.cos(tilt), np.sin(tilt)
    dx, dy = (_XX - cx) / scale, (_YY - cy) / scale
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    if flip:
        u = -u
    prim, sec = _col(PALETTE[identity.primary]), _col(PALETTE[identity.secondary])
    head_col = prim if identity.head == "primary" else sec
    eye_col = _col(EYE_COLORS[identity.eye])
    px = 1.0 / scale  # one output pixel in local units
    color = np.zeros((_N, _N, 3), np.float32)
    cover = np.zeros((_N, _N), bool)

    # pattern in body coordinates, period ~4 output px (2-px bands)
    pu, pv = u / (2 * px), v / (2 * px)
    if identity.pattern == "solid":
        pat = np.zeros_like(u, bool)
    elif identity.pattern == "hstripes":
        pat = np.floor(pv) % 2 == 0
    elif identity.pattern == "vstripes":
        pat = np.floor(pu) % 2 == 0
    elif identity.pattern == "checker":
        pat = (np.floor(pu) + np.floor(pv)) % 2 == 0
    elif identity.pattern == "dots":
        fu, fv = pu / 1.5 % 2 - 1, pv / 1.5 % 2 - 1
        pat = fu * fu + fv * fv < 0.35
    else:
        raise ValueError(f"unknown pattern {identity.pattern!r}")

    def fill(region, col):
        color[region] = col
        cover[:] |= region

    def body_fill(region):
        fill(region, prim)
        color[region & pat] = sec

    if identity.class_name == "cat":
        tail = (np.abs(u - 0.62 - 0.25 * np.sin(v * 3.0)) < 0.09) & (v > -0.2) & (v < 0.75)
        fill(tail, prim)
        body = ((u / 0.58) ** 2 + ((v - 0.38) / 0.48) ** 2) <= 1
        body_fill(body)
        hx, hy, hr = 0.0, -0.42, 0.42
        for side in (-1, 1):
            ex = hx + side * 0.27
            if identity.part == "pointy":
                ear = (v <= hy - 0.15) & (v >= hy - 0.62) & (np.abs(u - ex) <= 0.17 * (v - (hy - 0.62)) / 0.47)
            elif identity.part == "round":
                ear = ((u - ex) ** 2 + (v - (hy - 0.33)) ** 2) <= 0.16 ** 2
            else:  # tall
                ear = (v <= hy - 0.15) & (v >= hy - 0.85) & (np.abs(u - ex) <= 0.11)
            fill(ear, head_col)
        head = ((u - hx) ** 2 + (v - hy) ** 2) <= hr * hr
        fill(head, head_col)
        for side in (-1, 1):
            eye = ((u - side * 0.16) ** 2 + (v - (hy - 0.02)) ** 2) <= max(0.10, 0.75 * px) ** 2
            color[eye & head] = eye_col
        nose = (np.abs(u) < max(0.05, 0.5 * px)) & (np.abs(v - (hy + 0.17)) < max(0.04, 0.4 * px))
        color[nose & head] = (0.9, 0.5, 0.55)
    elif identity.class_name == "robot":
        for side in (-1, 1):
            leg = (np.abs(u - side * 0.27) <= 0.12) & (v >= 0.6) & (v <= 0.98)
            fill(leg, (0.45, 0.45, 0.5))
        body = (np.abs(u) <= 0.5) & (v >= -0.15) & (v <= 0.65)
        body_fill(body)
        hy = -0.45
        if identity.part == "single":
            ant = (np.abs(u) <= 0.05 + 0.3 * px) & (v <= hy - 0.25) & (v >= hy - 0.62)
            fill(ant, (0.55, 0.55, 0.6))
            fill(((u ** 2 + (v - (hy - 0.66)) ** 2) <= 0.11 ** 2), (0.95, 0.15, 0.15))
        elif identity.part == "double":
            for side in (-1, 1):
                ant = (np.abs(u - side * 0.22 - side * 0.4 * (hy - 0.25 - v)) <= 0.05 + 0.3 * px) & \
                      (v <= hy - 0.25) & (v >= hy - 0.6)
                fill(ant, (0.55, 0.55, 0.6))
        else:  # dish: a flat wide plate on a short neck
            fill((np.abs(u) <= 0.06 + 0.3 * px) & (v <= hy - 0.25) & (v >= hy - 0.42), (0.55, 0.55, 0.6))
            fill((np.abs(u) <= 0.36) & (v <= hy - 0.40) & (v >= hy - 0.52), (0.75, 0.75, 0.8))
        head = (np.abs(u) <= 0.36) & (np.abs(v - hy) <= 0.27)
        fill(head, head_col)
        for side in (-1, 1):
            eye = (np.abs(u - side * 0.15) <= max(0.08, 0.6 * px)) & (np.abs(v - (hy - 0.02)) <= max(0.08, 0.6 * px))
            color[eye & head] = eye_col
        mouth = (np.abs(u) <= 0.16) & (np.abs(v - (hy + 0.15)) <= max(0.03, 0.35 * px))
        color[mouth & head] = (0.2, 0.2, 0.22)
    else:
        raise ValueError(f"unknown class {identity.class_name!r}; expected one of {CLASSES}")
    return color, cover


def _downsample(a: np.ndarray) -> np.ndarray:
    """Box filter from the supersampled grid to RESOLUTION."""
    sh = a.shape
    return a.reshape(RESOLUTION, _SS, RESOLUTION, _SS, *sh[2:]).mean(axis=(1, 3))


def render(identity: Identity, context: Context, seed: int) -> Sample:
    """Render ``identity`` in ``context``; pose (flip, tilt), position, scale and lighting jitter come from ``seed``."""
    rng = np.random.default_rng(seed)
    _context_words(context)  # validates
    night = context.light == "night"
    horizon = float(rng.uniform(7, 12))
    img = _background(context.background, horizon, rng, night)

    scale = float(rng.uniform(7.5, 10.0))       # output pixels per local unit: subject ~15-20 px tall
    side = 1 if rng.random() < 0.5 else -1       # which side the subject is shifted to (object goes opposite)
    cx = RESOLUTION / 2 + side * float(rng.uniform(0, 5)) if context.obj else RESOLUTION / 2 + float(rng.uniform(-4, 4))
    cy = RESOLUTION - 1.0 * scale - float(rng.uniform(1.0, 3.0))
    flip = bool(rng.random() < 0.5)
    tilt = float(rng.uniform(-0.25, 0.25))

    if context.obj is not None:
        size = float(rng.uniform(11, 14))
        ox = cx - side * float(rng.uniform(11, 13))
        ox = float(np.clip(ox, 0.3 * size, RESOLUTION - 0.3 * size))
        oy = float(rng.uniform(horizon + 9, RESOLUTION - 1))
        _draw_object(img, context.obj, ox, oy, size)

    color, cover = _subject(identity, cx, cy, scale, flip, tilt)
    img[cover] = color[cover]

    # lighting: global brightness, a soft left-right gradient, and a night tint
    gain = float(rng.uniform(0.9, 1.1))
    grad = float(rng.uniform(-0.12, 0.12)) * (_XX - RESOLUTION / 2) / RESOLUTION
    light = (gain + grad)[..., None]
    if night:
        img = img * light * _col((0.42, 0.46, 0.68))
        mx, my = (5.0 if rng.random() < 0.5 else RESOLUTION - 5.0), float(rng.uniform(2.5, 4.5))
        moon = _disk(mx, my, 2.2) & (_YY < horizon) & ~cover
        img[moon] = _col((0.95, 0.93, 0.75))
        stars = (rng.random((RESOLUTION, RESOLUTION)) < 0.03).repeat(_SS, 0).repeat(_SS, 1) & (_YY < horizon) & ~cover
        img[stars] = _col((0.8, 0.8, 0.9))
    else:
        img = img * light
    image = np.clip(_downsample(img), 0, 1).astype(np.float32)
    mask = (_downsample(cover.astype(np.float32)) >= 0.5).astype(np.float32)
    return Sample(image=torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                  mask=torch.from_numpy(mask)[None], caption=caption(identity.class_name, context),
                  identity=identity, context=context)


@dataclass
class PairSample:
    image: torch.Tensor     # [3, R, 2R]: identity_a on the left half, identity_b on the right
    masks: torch.Tensor     # [2, 1, R, 2R]: each subject's
    context: Context


def render_pair(identity_a: Identity, identity_b: Identity, context: Context, seed: int) -> PairSample:
    """Two subjects in one scene of RESOLUTION x 2·RESOLUTION, ``identity_a`` left and ``identity_b`` right: two
    renders side by side drawn with the same seed, so the horizon, ground texture and lighting continue across the
    seam (the reference picture of several concepts in one image; the eval scores each half on its own)."""
    a, b = render(identity_a, context, seed), render(identity_b, context, seed)
    zero = torch.zeros_like(a.mask)
    return PairSample(torch.cat([a.image, b.image], -1),
                      torch.stack([torch.cat([a.mask, zero], -1), torch.cat([zero, b.mask], -1)]), context)


# ----------------------------------------------------------------------------------------------------------------
# batches and dataset folders


def batch(split: str, n: int, seed: int, identities_subset: list[Identity] | None = None):
    """``n`` random renders of ``split`` identities in random contexts, with varied captions.

    Returns (images [n,3,R,R] in [0,1], masks [n,1,R,R], captions, identity ids LongTensor [n])."""
    idents = identities_subset if identities_subset is not None else identities(split)
    rng = np.random.default_rng(seed)
    images, masks, caps, ids = [], [], [], []
    for _ in range(n):
        ident = idents[int(rng.integers(len(idents)))]
        ctx = random_context(rng)
        s = render(ident, ctx, int(rng.integers(2 ** 31)))
        images.append(s.image)
        masks.append(s.mask)
        caps.append(caption(ident.class_name, ctx, rng=rng))
        ids.append(ident.id)
    return torch.stack(images), torch.stack(masks), caps, torch.tensor(ids, dtype=torch.long)


PALETTE_NAMES: tuple[str, ...] = ("red", "orange", "yellow", "blue", "purple", "pink", "black", "white")
EYE_NAMES: tuple[str, ...] = ("green", "cyan", "red", "yellow")


def describe(identity: Identity) -> str:
    """An identity's attributes in words (for listings; captions never carry them)."""
    i = identity
    return (f"{PALETTE_NAMES[i.primary]} body, {PALETTE_NAMES[i.secondary]} {i.pattern}, head {i.head}, "
            f"{EYE_NAMES[i.eye]} eyes, {i.part} {'ears' if i.class_name == 'cat' else 'antenna'}")


def split_of(identity_id: int) -> str:
    if identity_id >= EXTRA_ID_OFFSET + len(CLASSES) * N_EXTRA_PER_CLASS:
        return "rest"
    return "extra" if identity_id >= EXTRA_ID_OFFSET else "heldout" if identity_id >= HELDOUT_ID_OFFSET else "train"


def export_folder(split: str, n: int, out_dir: str | Path, seed: int, identity_id: int | None = None) -> None:
    """Write ``n`` samples as NNNNN.png, NNNNN.txt (caption), NNNNN_mask.png and one metadata.jsonl line each
    ({file, caption, identity, class}) — the folder layout the trainers and the ComfyUI loaders read. With
    ``identity_id``: ``n`` photos of that one identity in random contexts (what `boothkit tune --images` takes); its
    split is the id's, ``split`` is not used."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if identity_id is not None:
        ident = identity_by_id(identity_id)
        rng = np.random.default_rng(seed)
        samples = identity_renders(ident, n, seed)
        images = torch.stack([s.image for s in samples])
        masks = torch.stack([s.mask for s in samples])
        caps = [caption(ident.class_name, s.context, rng=rng) for s in samples]
        ids = torch.full((n,), ident.id, dtype=torch.long)
        split = split_of(ident.id)
    else:
        images, masks, caps, ids = batch(split, n, seed)
    lookup = {i.id: i for i in identities(split)}
    lines = []
    for k in range(n):
        name = f"{k:05d}"
        img = (images[k].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(img).save(out / f"{name}.png")
        Image.fromarray((masks[k, 0].numpy() * 255).astype(np.uint8)).save(out / f"{name}_mask.png")
        (out / f"{name}.txt").write_text(caps[k] + "\n")
        lines.append(json.dumps({"file": f"{name}.png", "caption": caps[k], "identity": int(ids[k]),
                                 "class": lookup[int(ids[k])].class_name}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def identity_renders(identity: Identity, n: int, seed: int) -> list[Sample]:
    """``n`` renders of one identity in random contexts (the "few photos of the subject" a method gets)."""
    rng = _random.Random(seed)
    return [render(identity, random_context(rng), rng.randrange(2 ** 31)) for _ in range(n)]
