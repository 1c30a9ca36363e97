"""`boothkit eval`: every personalization method on held-out toy-world identities, scored like the papers do.

identity  cosine in the toy identity network (the face-recognition analogue) between each generated image and the
          mean embedding of the subject's reference images
CLIP-I    cosine of toy-CLIP image embeddings, generated vs references
CLIP-T    cosine between a generated image and its prompt without the identifier ("a photo of a cat on sand at
          night"), in toy CLIP
context   CLIP-T's margin on the context words alone: that cosine minus the mean cosine with the same prompt with one
          context word changed; the class noun is in both, so it scores the context, not the subject's clarity
time      seconds to personalize one concept (encoding or tuning), and seconds per generated image

"± x" is the standard deviation over subjects of the per-subject means, except after a context / base ratio: there
it is the ratio's standard error, paired with the base's rows subject by subject (``ratio_se``). Everything is
seeded; the table is written as JSON and Markdown."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch


log = logging.getLogger(__name__)


@dataclass
class Subject:
    """One held-out identity as a user would hand it over: a few photos with masks, and its class noun."""

    identity: object
    class_name: str
    noun: str
    images: torch.Tensor  # [K, 3, R, R] in [0, 1]
    masks: torch.Tensor  # [K, 1, R, R]


def make_subjects(n: int, k_refs: int, seed: int, dev: bool = False, split: str = "heldout") -> list[Subject]:
    """The first ``n`` held-out identities (classes interleaved), or with ``dev`` the last ``n``: a development set
    to choose settings on, disjoint from the table's subjects while 2n <= the held-out count. ``split="train"`` takes
    training identities instead (what the trainers saw: a memorisation check)."""
    from . import domain

    ids = domain.identities(split)
    if n > len(ids):
        name = "held-out" if split == "heldout" else split
        raise ValueError(f"only {len(ids)} {name} identities exist; asked for {n}")
    # interleave classes so a small n still covers every class
    by_class: dict[str, list] = {}
    for ident in ids:
        by_class.setdefault(ident.class_name, []).append(ident)
    order = [x for group in zip(*by_class.values()) for x in group] + \
        [x for x in ids if x not in {y for g in zip(*by_class.values()) for y in g}]
    out = []
    for ident in (order[len(order) - n:][::-1] if dev else order[:n]):
        rng = np.random.default_rng(seed * 7919 + ident.id)
        samples = [domain.render(ident, domain.random_context(rng), seed=int(rng.integers(1 << 30)))
                   for _ in range(k_refs)]
        out.append(Subject(ident, ident.class_name, domain.CLASS_NOUNS[ident.class_name][0],
                           torch.stack([s.image for s in samples]), torch.stack([s.mask for s in samples])))
    return out


def all_contexts() -> list:
    """Every context of the domain (background × light × object or none), in a fixed order."""
    from . import domain

    return [domain.Context(b, light, o) for b in domain.BACKGROUNDS for light in domain.LIGHTS
            for o in (None,) + tuple(domain.OBJECTS)]


def eval_contexts(count: int, seed: int, dev: bool = False, draw: str = "halves"):
    """``count`` distinct contexts. The domain's contexts are shuffled by ``seed``; the table draws from the first
    half and the development set (``dev``) from the second, so no setting chosen on the development set was chosen
    on a context the table scores. ``draw="random"``: the draw of tables written before issue #30 (independent
    random contexts, the same for the table and the development set), to add rows to those tables."""
    if draw == "random":
        from . import domain

        rng = np.random.default_rng(seed + 17)
        return [domain.random_context(rng) for _ in range(count)]
    if draw != "halves":
        raise ValueError(f"context draw {draw!r}; expected halves or random")
    contexts = all_contexts()
    order = np.random.default_rng(seed + 17).permutation(len(contexts))
    half = len(contexts) // 2
    pool = order[half:] if dev else order[:half]
    if count > len(pool):
        raise ValueError(f"the {'development' if dev else 'table'} half has {len(pool)} contexts; asked for {count}")
    return [contexts[int(i)] for i in pool[:count]]


def prompts_for(subject: Subject, contexts, identifier: str | None) -> tuple[list[str], list[str]]:
    """(prompts the method gets, context-only prompts CLIP-T scores against)."""
    from . import domain

    with_id = [domain.caption(subject.class_name, c, noun=subject.noun, identifier=identifier) for c in contexts]
    plain = [domain.context_prompt(subject.class_name, c) for c in contexts]
    return with_id, plain


def context_alternatives(subject: Subject, contexts) -> list[list[str]]:
    """For each context, the scored prompt with one context word changed (what ``context`` is measured against)."""
    from . import domain

    return [[domain.context_prompt(subject.class_name, c) for c in domain.one_field_changes(ctx)]
            for ctx in contexts]


def mean_se(x) -> float:
    """Standard error of the mean of ``x`` (its standard deviation / √n)."""
    x = np.asarray(x, dtype=float)
    return float(x.std(ddof=1) / np.sqrt(len(x)))


def ratio_se(a: list[float], b: list[float]) -> float | None:
    """Standard error of mean(a) / mean(b) over subjects measured on both (the delta method, paired: each subject's
    a − R·b; the same contexts and seeds make a and b move together, so the paired error is the smaller one)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(a) != len(b) or b.mean() == 0:
        return None
    d = a - a.mean() / b.mean() * b
    return mean_se(d) / abs(float(b.mean()))


def with_ratios(rows: dict) -> dict:
    """Each row's CLIP-T and context margin as a fraction of the base model's (the quality bar's figures), and the
    context ratio's standard error where both rows have per-subject margins (tables from before have none)."""
    base = rows.get("base", {})
    for r in rows.values():
        for key in ("clip_t", "context"):
            ok = base.get(key) and r.get(key) is not None
            r[f"{key}_vs_base"] = r[key] / base[key] if ok else None
        a, b = r.get("context_per_subject"), base.get("context_per_subject")
        r["context_vs_base_se"] = None if r is base or not (a and b) else ratio_se(a, b)
    return rows


def evaluate(methods: list[str] | None, n_subjects: int, k_refs: int, n_contexts: int, samples_per_prompt: int,
             seed: int, steps: int, overrides: dict | None = None, dev: bool = False, split: str = "heldout",
             context_draw: str = "halves", base_from: tuple[dict, str] | None = None) -> dict:
    """``base_from`` (a table and its name): its base row stands in for running the base model (``with_base``).
    ``overrides`` replace the shipped files' inference defaults: ``beta`` / ``alpha`` (InstantBooth's β / α),
    ``start_percent`` (the share of sampling after which InstantBooth's adapters act),
    ``adapters_on_uncond`` (InstantBooth's adapters on the unconditional half of guidance too, or not),
    ``instantbooth`` (another InstantBooth file), ``e4t_lr`` (E4T's tune learning rate), ``e4t`` (another pre-trained
    E4T file, e.g. a new run's); the table records them."""
    from .methods import DEFAULT_METHODS, METHODS, ToyEnv
    from .scorers import load_scorers

    unknown = [m for m in methods or [] if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    env = ToyEnv.load(sample_steps=steps)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "instantbooth" in overrides:
        from ..backend.instantbooth import load_instantbooth

        env.instantbooth = load_instantbooth(overrides["instantbooth"], family="toy", ctx_dim=env.base.ctx_dim).eval()
    for key in ("beta", "alpha", "adapters_on_uncond", "start_percent"):
        if key in overrides and env.instantbooth is not None:
            setattr(env.instantbooth.config, key, overrides[key])
    if "e4t" in overrides:
        from ..backend.e4t import load_e4t

        env.e4t = load_e4t(overrides["e4t"], family="toy")
    if "e4t_lr" in overrides and env.e4t is not None:
        env.e4t.config.tune_lr = overrides["e4t_lr"]
    if methods is None:  # the default: every method whose trained files exist
        trained = {"instantbooth": env.instantbooth is not None, "e4t": env.e4t is not None}
        methods = [m for m in DEFAULT_METHODS if trained.get(m.split("-")[0], True)]
        for name, ok in trained.items():
            if not ok:
                log.warning("%s left out: the toy world has no trained %s file yet", name, name)
    subjects = make_subjects(n_subjects, k_refs, seed, dev, split)
    contexts = eval_contexts(n_contexts, seed, dev, context_draw)
    settings = {"subjects": n_subjects, "references": k_refs, "contexts": n_contexts,
                "samples_per_prompt": samples_per_prompt, "seed": seed,
                "subject_ids": [subj.identity.id for subj in subjects],
                "sample_steps": steps, "threads": torch.get_num_threads(),
                **({"dev": True} if dev else {}),
                **({"split": split} if split != "heldout" else {}),
                # contexts drawn from the table's or the development half of the domain's (eval_contexts)
                **({"context_draw": context_draw} if context_draw != "random" else {}),
                **({"overrides": overrides} if overrides else {})}
    if base_from is not None:  # refused before the run, not after it
        check_base(settings, methods, *base_from)
    scorers = load_scorers()
    rows = {}
    from tqdm.auto import tqdm

    for name in methods:
        method = METHODS[name]
        ids, clip_i, clip_t, context, prep, per_image = [], [], [], [], [], []
        for subj in tqdm(subjects, desc=f"eval {name}", dynamic_ncols=True):
            prompts, plain = prompts_for(subj, contexts, env.identifier)
            prompts = [p for p in prompts for _ in range(samples_per_prompt)]
            plain = [p for p in plain for _ in range(samples_per_prompt)]
            alternatives = [a for a in context_alternatives(subj, contexts) for _ in range(samples_per_prompt)]
            t0 = time.perf_counter()
            generate = method(env, subj, seed)
            t1 = time.perf_counter()
            images = generate(prompts, plain, seed)
            t2 = time.perf_counter()
            prep.append(t1 - t0)
            per_image.append((t2 - t1) / len(prompts))
            ids.append(scorers.identity_similarity(images, subj.images).mean().item())
            clip_i.append(scorers.clip_i(images, subj.images).mean().item())
            clip_t.append(scorers.clip_t(images, plain).mean().item())
            context.append(scorers.context_margin(images, plain, alternatives).mean().item())
        # per class: a method can learn one class's identities in its steps and not the other's
        classes = [subj.class_name for subj in subjects]
        by_class = {c: float(np.mean([i for i, k in zip(ids, classes) if k == c])) for c in sorted(set(classes))}
        rows[name] = {"identity": float(np.mean(ids)), "identity_std": float(np.std(ids)),
                      "identity_by_class": by_class,
                      # in the order of settings["subject_ids"]: which subjects a method fails on, and its spread
                      "identity_per_subject": [round(i, 4) for i in ids],
                      "clip_i": float(np.mean(clip_i)), "clip_t": float(np.mean(clip_t)),
                      "context": float(np.mean(context)), "context_std": float(np.std(context)),
                      "context_per_subject": [round(c, 5) for c in context],
                      "personalize_s": float(np.mean(prep)), "sample_s_per_image": float(np.mean(per_image))}
    result = {"methods": with_ratios(rows), "settings": settings}
    return result if base_from is None else with_base(result, *base_from)


def to_markdown(result: dict) -> str:
    s = result["settings"]
    classes = sorted({c for r in result["methods"].values() for c in r.get("identity_by_class") or {}})
    which = " (development set)" if s.get("dev") else ""
    kind = "Training" if s.get("split") == "train" else "Held-out"
    lines = [f"{kind} toy-world identities{which}: {s['subjects']} subjects × {s['contexts']} prompts × "
             f"{s['samples_per_prompt']} samples, {s['references']} reference images each, seed {s['seed']}, "
             f"{s['sample_steps']} DDIM steps, {s['threads']} CPU threads"
             + "".join(f", {k} {v}" for k, v in s.get("overrides", {}).items()) + ".", "",
             "| method | identity ↑ | " + (f"identity {' / '.join(classes)} | " if classes else "") +
             "CLIP-I ↑ | CLIP-T ↑ | CLIP-T / base | context ↑ | context / base | personalize s/concept | s/image |",
             "|---|---|" + ("---|" if classes else "") + "---|---|---|---|---|---|---|"]

    def fmt(x, std=None):
        return "–" if x is None else f"{x:.3f}" + ("" if std is None else f" ± {std:.3f}")

    def per_class(r):  # rows from tables written before the per-class means existed have none
        by = r.get("identity_by_class") or {}
        return " / ".join(fmt(by.get(c)) for c in classes) + " | " if classes else ""
    for name, r in result["methods"].items():
        lines.append(f"| {name} | {r['identity']:.3f} ± {r['identity_std']:.3f} | {per_class(r)}{r['clip_i']:.3f} | "
                     f"{r['clip_t']:.3f} | {fmt(r.get('clip_t_vs_base'))} | "
                     f"{fmt(r.get('context'), r.get('context_std'))} | "
                     f"{fmt(r.get('context_vs_base'), r.get('context_vs_base_se'))} | {r['personalize_s']:.2f} | "
                     f"{r['sample_s_per_image']:.3f} |")
    if any(r.get("context_vs_base_se") is not None for r in result["methods"].values()):
        lines += ["", "± is the spread over subjects, except after context / base: that ratio's standard error, "
                      "paired with the base's rows subject by subject."]
    return "\n".join(lines) + "\n"


# what a table's rows were drawn with, beside which subjects: rows compare only under the same
SAMPLING = ("references", "contexts", "samples_per_prompt", "seed", "sample_steps", "context_draw", "split")


def merge(old: dict, new: dict) -> dict:
    """``new``'s rows added to ``old``'s table, in the methods' canonical order; the settings must agree."""
    from .methods import DEFAULT_METHODS, METHODS

    keys = ("subjects",) + SAMPLING
    if any(old["settings"].get(k) != new["settings"].get(k) for k in keys + ("dev",)) or \
            (old["settings"].get("overrides") or {}) != (new["settings"].get("overrides") or {}):
        raise ValueError(f"--update needs the settings of the existing table: "
                         f"{ {k: old['settings'].get(k) for k in keys} }")
    rows = {**old["methods"], **new["methods"]}
    order = DEFAULT_METHODS + [m for m in METHODS if m not in DEFAULT_METHODS]
    rows = {k: rows[k] for k in sorted(rows, key=lambda k: order.index(k) if k in order else len(order))}
    return {"methods": with_ratios(rows), "settings": old["settings"]}


def sampling_of(settings: dict) -> dict:
    """How a table was drawn: the settings that must agree for two tables' subjects to be compared."""
    return {k: settings.get(k) for k in SAMPLING}


def check_base(settings: dict, methods: list[str] | None, other: dict, name: str) -> None:
    """``other`` (table ``name``) can lend its base row to a run of ``settings``: same subjects and draw."""
    so = other["settings"]
    if methods is None or "base" in methods:
        raise ValueError("--base-from reads the base row from another table; name --methods without base")
    if "base" not in other["methods"]:
        raise ValueError(f"{name} has no base row (it has {', '.join(other['methods'])})")
    if so["subject_ids"] != settings["subject_ids"] or sampling_of(so) != sampling_of(settings) \
            or so.get("dev") != settings.get("dev"):
        raise ValueError(f"--base-from needs a table of the same subjects and draw: {name} has subjects "
                         f"{so['subject_ids'][:3]}... {sampling_of(so)}, this run {settings['subject_ids'][:3]}... "
                         f"{sampling_of(settings)}")


def with_base(result: dict, other: dict, name: str) -> dict:
    """``result`` with the base row of ``other`` (table ``name``), of the same subjects and draw: the base model takes
    no override, so a run of one InstantBooth setting gets its ratios without running the base again."""
    rows = {"base": other["methods"]["base"], **result["methods"]}
    return {"methods": with_ratios(rows), "settings": {**result["settings"], "base_from": name}}


def check_alike(tables: list[dict]) -> None:
    """Tables pooled by --paired: drawn alike and run with the same overrides."""
    first = tables[0]["settings"]
    for t in tables:
        st = t["settings"]
        if sampling_of(st) != sampling_of(first) or st.get("overrides") != first.get("overrides"):
            raise ValueError(f"--paired needs tables drawn alike: {sampling_of(st)} against {sampling_of(first)}")


def paired(tables: list[dict], a: str, b: str, versus: list[dict] | None = None) -> dict:
    """Method ``a`` against ``b``, paired by subject over the subjects of all ``tables`` (eval.json results, e.g. the
    held-out table and a ``--dev`` one): both means, the mean of the per-subject differences a − b with its standard
    error (their standard deviation / √n), and on how many subjects a scores above b; the same for the context margin
    where both rows have it per subject. The tables must not share a
    subject and must be drawn alike (references, contexts, samples, seed, steps, overrides).

    With ``versus`` (one table per table, of the same subjects and draw), ``b`` is read from those: the same method
    run two ways (two InstantBooth files, two βs) is compared where its rows share a name."""
    if versus is not None and len(versus) != len(tables):
        raise ValueError(f"--versus needs one table per --tables table (the same subjects): {len(versus)} against "
                         f"{len(tables)}")
    xs, ys, cxs, cys, seen = [], [], [], [], set()
    check_alike(tables)
    if versus is not None:
        check_alike(versus)
    for i, t in enumerate(tables):
        st = t["settings"]
        if seen & set(st["subject_ids"]):
            raise ValueError(f"--paired counts each subject once: subjects {sorted(seen & set(st['subject_ids']))} "
                             f"are in two tables")
        seen |= set(st["subject_ids"])
        u = t if versus is None else versus[i]
        if u is not t:
            su = u["settings"]
            if su["subject_ids"] != st["subject_ids"] or sampling_of(su) != sampling_of(st):
                raise ValueError(f"--versus pairs tables of the same subjects and draw: subjects "
                                 f"{su['subject_ids'][:3]}... {sampling_of(su)} against "
                                 f"{st['subject_ids'][:3]}... {sampling_of(st)}")
        for m, row in ((a, t), (b, u)):
            if m not in row["methods"]:
                raise ValueError(f"the table of subjects {row['settings']['subject_ids'][:3]}... has no row {m!r} "
                                 f"(it has {', '.join(row['methods'])})")
        xs += t["methods"][a]["identity_per_subject"]
        ys += u["methods"][b]["identity_per_subject"]
        ca, cb = t["methods"][a].get("context_per_subject"), u["methods"][b].get("context_per_subject")
        cxs, cys = (cxs + ca, cys + cb) if cxs is not None and ca and cb else (None, None)
    x, y = np.array(xs), np.array(ys)
    d = x - y
    if len(d) < 2:
        raise ValueError("--paired needs at least two subjects")
    out = {"a": a, "b": b, "subjects": len(d), "identity_a": float(x.mean()), "identity_b": float(y.mean()),
           "difference": float(d.mean()),
           "difference_se": mean_se(d), "a_above": int((d > 0).sum())}
    if cxs is not None:  # rows written since the per-subject context margins: the margin compared the same way
        dc = np.array(cxs) - np.array(cys)
        out |= {"context_a": float(np.mean(cxs)), "context_b": float(np.mean(cys)),
                "context_difference": float(dc.mean()),
                "context_difference_se": mean_se(dc)}
    return out
