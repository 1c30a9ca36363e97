"""The toy world's evaluation and demo, run small on the shipped weights."""
import json

import numpy as np
import pytest
import torch

from boothkit.toyworld import domain
from boothkit.commands.eval import main as eval_main
from boothkit.toyworld.evaluate import eval_contexts, make_subjects, prompts_for, ratio_se, to_markdown, with_ratios


def test_subjects_are_held_out_and_deterministic():
    from boothkit.toyworld import domain

    a, b = make_subjects(4, 3, seed=0), make_subjects(4, 3, seed=0)
    train_ids = {i.id for i in domain.identities("train")}
    assert all(s.identity.id not in train_ids for s in a), "evaluation uses held-out identities only"
    assert {s.class_name for s in a} == set(domain.CLASS_NOUNS), "a small eval still covers every class"
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))
    assert a[0].images.shape == (3, 3, 32, 32) and a[0].masks.shape == (3, 1, 32, 32)
    with pytest.raises(ValueError, match="only 32 held-out identities exist"):
        make_subjects(10_000, 1, 0)


def test_dev_subjects_are_held_out_and_disjoint_from_the_table():
    from boothkit.toyworld import domain

    n = len(domain.identities("heldout")) // 2
    table, dev = make_subjects(n, 1, 0), make_subjects(n, 1, 0, dev=True)
    assert {s.identity.id for s in table}.isdisjoint({s.identity.id for s in dev})
    assert {s.identity.id for s in dev} <= {i.id for i in domain.identities("heldout")}
    assert {s.class_name for s in make_subjects(2, 1, 0, dev=True)} == set(domain.CLASS_NOUNS)


def test_prompts_carry_the_identifier_and_the_scored_text_does_not():
    s = make_subjects(1, 1, 0)[0]
    with_id, plain = prompts_for(s, eval_contexts(3, 0), "sks")
    assert all(f"sks {s.noun}" in p for p in with_id)
    assert all("sks" not in p for p in plain)


def test_markdown_table_lists_every_method():
    result = {"settings": {"subjects": 2, "contexts": 1, "samples_per_prompt": 1, "references": 3, "seed": 0,
                           "sample_steps": 5, "threads": 2},
              "methods": {"base": {"identity": 0.1, "identity_std": 0.0, "clip_i": 0.5, "clip_t": 0.3,
                                   "clip_t_vs_base": 1.0, "context": 0.12, "context_std": 0.02,
                                   "context_vs_base": 1.0,
                                   "personalize_s": 0.0, "sample_s_per_image": 0.1},
                          "instantbooth": {"identity": 0.5, "identity_std": 0.1, "clip_i": 0.6, "clip_t": 0.29,
                                           "clip_t_vs_base": 0.97, "context": 0.108, "context_vs_base": 0.9,
                                           "personalize_s": 0.02, "sample_s_per_image": 0.1},
                          # a row from a table written before the context margin existed
                          "quicktune": {"identity": 0.8, "identity_std": 0.1, "clip_i": 0.7, "clip_t": 0.3,
                                        "clip_t_vs_base": 1.0, "personalize_s": 70.0, "sample_s_per_image": 0.1}}}
    md = to_markdown(result)
    assert "| base | 0.100 ± 0.000 | 0.500 | 0.300 | 1.000 | 0.120 ± 0.020 | 1.000 |" in md
    assert "| instantbooth | 0.500 ± 0.100 | 0.600 | 0.290 | 0.970 | 0.108 | 0.900 |" in md
    assert "| quicktune | 0.800 ± 0.100 | 0.700 | 0.300 | 1.000 | – | – |" in md
    assert "per class" not in md and "identity cat" not in md  # no row has the per-class means: no column

    result["methods"]["instantbooth"]["identity_by_class"] = {"cat": 0.3, "robot": 0.7}
    md = to_markdown(result)
    assert "| method | identity ↑ | identity cat / robot | CLIP-I ↑ |" in md
    assert "| instantbooth | 0.500 ± 0.100 | 0.300 / 0.700 | 0.600 | 0.290 |" in md
    assert "| quicktune | 0.800 ± 0.100 | – / – | 0.700 |" in md
    assert all(line.count("|") == 11 for line in md.splitlines() if line.startswith("|"))


def test_the_context_ratio_carries_its_paired_standard_error():
    base = [0.10, 0.20, 0.30, 0.40]
    assert ratio_se([0.09, 0.18, 0.27, 0.36], base) == pytest.approx(0.0), "a constant ratio has no error"
    a = [0.10, 0.16, 0.30, 0.36]
    r = np.mean(a) / np.mean(base)
    d = np.array(a) - r * np.array(base)
    assert ratio_se(a, base) == pytest.approx(d.std(ddof=1) / 2 / np.mean(base))
    assert ratio_se([0.1], [0.2]) is None and ratio_se([0.1, 0.2], [0.2, 0.3, 0.4]) is None
    rows = with_ratios({"base": {"context": 0.25, "context_per_subject": base},
                        "instantbooth": {"context": float(np.mean(a)), "context_per_subject": a},
                        "old": {"context": 0.2}})  # a row from before the per-subject margins
    assert rows["instantbooth"]["context_vs_base"] == pytest.approx(r)
    assert rows["instantbooth"]["context_vs_base_se"] == pytest.approx(ratio_se(a, base))
    assert rows["base"]["context_vs_base_se"] is None and rows["old"]["context_vs_base_se"] is None


def test_markdown_shows_the_context_ratio_error_and_says_what_it_is():
    row = {"identity": 0.5, "identity_std": 0.1, "clip_i": 0.6, "clip_t": 0.29, "clip_t_vs_base": 0.97,
           "context": 0.108, "context_std": 0.03, "context_vs_base": 0.942, "context_vs_base_se": 0.041,
           "personalize_s": 0.02, "sample_s_per_image": 0.1}
    result = {"settings": {"subjects": 2, "contexts": 1, "samples_per_prompt": 1, "references": 3, "seed": 0,
                           "sample_steps": 5, "threads": 1}, "methods": {"instantbooth": row}}
    md = to_markdown(result)
    assert "| 0.108 ± 0.030 | 0.942 ± 0.041 |" in md and "standard error" in md
    row["context_vs_base_se"] = None
    assert "standard error" not in to_markdown(result)


def test_eval_runs_end_to_end_on_the_base_model(tmp_path):
    assert eval_main(["--methods", "base", "--subjects", "2", "--contexts", "1", "--samples", "1", "--steps", "3",
                      "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    row = result["methods"]["base"]
    assert -1 <= row["identity"] <= 1 and -1 <= row["clip_t"] <= 1 and row["clip_t_vs_base"] == 1.0
    assert -2 <= row["context"] <= 2 and row["context_std"] >= 0 and row["context_vs_base"] == 1.0
    assert len(row["context_per_subject"]) == 2 and np.mean(row["context_per_subject"]) == pytest.approx(
        row["context"], abs=1e-5)
    by_class = row["identity_by_class"]  # the first two held-out identities: one cat, one robot
    assert sorted(by_class) == ["cat", "robot"]
    assert sum(by_class.values()) / 2 == pytest.approx(row["identity"])
    assert abs(by_class["cat"] - by_class["robot"]) == pytest.approx(2 * row["identity_std"], abs=1e-6)
    heldout = [i.id for i in domain.identities("heldout")]
    assert result["settings"]["subject_ids"] == [heldout[0], heldout[domain.N_HELDOUT_PER_CLASS]]
    per_subject = row["identity_per_subject"]  # one cat, one robot: the same values as the per-class means
    assert per_subject == pytest.approx([by_class["cat"], by_class["robot"]], abs=1e-4)
    assert (tmp_path / "eval.md").read_text().startswith("Held-out toy-world identities")


def test_update_adds_rows_to_the_table_of_the_same_settings(tmp_path):
    common = ["--subjects", "1", "--contexts", "1", "--samples", "1", "--steps", "2", "--out", str(tmp_path)]
    assert eval_main(["--methods", "e4t-0"] + common) == 0
    assert eval_main(["--methods", "base", "--update"] + common) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert list(result["methods"]) == ["base", "e4t-0"], "rows in the methods' order, the old one kept"
    assert result["methods"]["e4t-0"]["clip_t_vs_base"] == pytest.approx(
        result["methods"]["e4t-0"]["clip_t"] / result["methods"]["base"]["clip_t"])
    assert result["methods"]["e4t-0"]["context_vs_base"] == pytest.approx(
        result["methods"]["e4t-0"]["context"] / result["methods"]["base"]["context"])
    with pytest.raises(ValueError, match="settings of the existing table"):
        eval_main(["--methods", "base", "--update", "--subjects", "2", "--contexts", "1", "--samples", "1",
                   "--steps", "2", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="settings of the existing table"):  # another β is another table
        eval_main(["--methods", "instantbooth", "--update", "--beta", "0.5"] + common)


def test_overrides_replace_the_shipped_defaults_and_are_recorded(tmp_path):
    common = ["--subjects", "1", "--contexts", "1", "--samples", "1", "--steps", "2"]
    assert eval_main(["--methods", "instantbooth", "--out", str(tmp_path / "a")] + common) == 0
    assert eval_main(["--methods", "instantbooth", "--beta", "0", "--out", str(tmp_path / "b")] + common) == 0
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in "ab")
    assert "overrides" not in a["settings"] and b["settings"]["overrides"] == {"beta": 0.0}
    assert a["methods"]["instantbooth"]["identity"] != b["methods"]["instantbooth"]["identity"], "β = 0 differs"
    assert "beta 0.0." in (tmp_path / "b" / "eval.md").read_text()


@pytest.mark.slow
def test_demo_writes_the_grid(tmp_path, capsys):
    """The README's main command with its defaults: E4T-15 and InstantBooth beside the base, labelled. Every method's
    column looks like the subject's input photos to the toy identity network, the base column does not (4 prompts, 3
    DDIM steps: base -0.14, InstantBooth 0.40 when this was written)."""
    from PIL import Image

    from boothkit.commands import demo
    from boothkit.toyworld.scorers import load_scorers

    drawn = {}

    def keep(inputs, columns, *rest):
        drawn.update(inputs=inputs, columns=columns)
        return grid(inputs, columns, *rest)

    grid, demo.labelled_grid = demo.labelled_grid, keep
    try:
        out = tmp_path / "demo.png"
        assert demo.main(["--steps", "3", "--prompts", "4", "--scale", "1", "--threads", "1", "--out", str(out)]) == 0
    finally:
        demo.labelled_grid = grid
    assert Image.open(out).mode == "RGB"
    out_text = capsys.readouterr().out
    assert "methods: e4t-15, instantbooth" in out_text and demo.DEFAULT_METHODS == ["e4t-15", "instantbooth"]
    assert "E4T-15 (15 steps, photo 1): personalize" in out_text and "InstantBooth (zero-shot" in out_text
    assert "row 1: a photo of a sks " in out_text and "(1 thread(s))" in out_text
    scorers = load_scorers()
    base, *methods = drawn["columns"]
    assert base.head == "base model" and [c.head for c in methods] == ["E4T-15", "InstantBooth"]
    base_identity = float(scorers.identity_similarity(base.images, drawn["inputs"]).mean())
    for c in methods:
        identity = float(scorers.identity_similarity(c.images, drawn["inputs"]).mean())
        assert identity > base_identity + 0.25, (c.head, identity, base_identity)


def test_demo_grid_places_each_column_under_its_head():
    """labelled_grid: the input photos, then one column per method in the given order, one row per prompt, text
    above (title, heads, prompts) and below (times)."""
    import numpy as np

    from boothkit.commands.demo import Column, labelled_grid

    def solid(rgb, n):
        return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, 32, 32).clone()

    rows = 2
    columns = [Column("base model", "no personalization", solid((0, 0, 1), rows)),
               Column("E4T-15", "15 steps, photo 1", solid((0, 1, 0), rows), 5.0, 2.0),
               Column("InstantBooth", "zero-shot", solid((1, 0, 1), rows), 0.01, 1.0)]
    img = np.asarray(labelled_grid(solid((1, 1, 0), 3), columns, ["prompt one", "prompt two"], "title", 2))

    def boxes(rgb):
        ys, xs = np.nonzero((img == np.array(rgb) * 255).all(-1))
        return sorted(set(xs.tolist())), sorted(set(ys.tolist()))

    inputs_x, inputs_y = boxes((1, 1, 0))
    base_x, base_y = boxes((0, 0, 1))
    e4t_x, e4t_y = boxes((0, 1, 0))
    ib_x, ib_y = boxes((1, 0, 1))
    assert len(base_x) == len(e4t_x) == len(ib_x) == 64, "one 64-px column each (32 px at 2x)"
    assert len(base_y) == len(e4t_y) == 2 * 64, "one cell per prompt"
    assert max(inputs_x) < min(base_x) < min(e4t_x) < min(ib_x), "inputs | base | methods in the given order"
    assert len(inputs_y) == 64 and min(inputs_y) == min(base_y), "the photos beside the first row"
    text = (img < 128).all(-1)  # dark text pixels on the white ground
    assert text[: min(base_y)].any(), "title and heads above the images"
    assert text[max(base_y) + 1:, min(e4t_x): max(e4t_x)].any(), "the times under a method's column"
    gap = np.nonzero(np.diff(base_y) > 1)[0]
    assert len(gap) == 1 and text[base_y[gap[0]] + 1: base_y[gap[0] + 1], min(base_x):].any(), \
        "the second prompt written between the rows"


def test_demo_out_takes_a_folder_and_refuses_other_formats(tmp_path, capsys):
    from boothkit.commands.demo import parse_args

    assert parse_args(["--out", str(tmp_path / "grids")]).out == str(tmp_path / "grids" / "demo.png")
    assert parse_args(["--out", str(tmp_path)]).out == str(tmp_path / "demo.png")
    assert parse_args(["--out", str(tmp_path / "a.PNG")]).out == str(tmp_path / "a.PNG")
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path / "grid.jpg")])
    assert "give a .png file or a folder" in capsys.readouterr().err


def test_quicktune_method_runs_without_touching_the_base():
    """2 + 2 steps: the method's plumbing and the base left as it was (that a quick-tune personalizes is
    tests/test_toy_personalization.py's)."""
    from boothkit.backend.quicktune import StageConfig
    from boothkit.toyworld.methods import ToyEnv, quicktune

    env = ToyEnv.load(sample_steps=2)
    before = {k: v.clone() for k, v in env.base.unet.state_dict().items()}
    subject = make_subjects(1, 2, 0)[0]
    method = quicktune(stage1=StageConfig(steps=2, lr=5e-3, batch_size=2),
                       stage2=StageConfig(steps=2, lr=1e-3, batch_size=2))
    generate = method(env, subject, 0)
    prompts, plain = prompts_for(subject, eval_contexts(2, 0), env.identifier)
    images = generate(prompts, plain, 0)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert all(torch.equal(v, before[k]) for k, v in env.base.unet.state_dict().items()), "base model untouched"


def test_untrained_e4t_ablation_starts_from_zero_and_leaves_the_shipped_file(monkeypatch):
    import boothkit.hosts.diffusers.e4t as host
    from boothkit.toyworld.methods import ToyEnv, e4t

    env = ToyEnv.load(sample_steps=2)
    before = {k: v.clone() for k, v in env.e4t.state_dict().items()}
    subject = make_subjects(1, 1, 0)[0]
    captured = {}
    real = host.e4t_tune

    def spy(model, vision, start, *a, **kw):
        captured["start"] = start
        return real(model, vision, start, *a, **kw)

    monkeypatch.setattr(host, "e4t_tune", spy)
    e4t(0, pretrained=False)(env, subject, seed=0)
    start = captured["start"]
    assert start is not env.e4t and start.config.rank == env.e4t.config.rank
    assert all(float(o.up.abs().sum()) == 0 for o in start.offsets.offsets), "Δ = 0"
    assert float(start.encoder.mlp[-1].weight.abs().sum()) == 0, "prediction 0: the class word"
    assert all(torch.equal(before[k], v) for k, v in env.e4t.state_dict().items())


def test_eval_takes_another_e4t_file_and_records_it(tmp_path):
    import shutil

    from boothkit.backend.files import FormatError
    from boothkit.toyworld import store

    other = tmp_path / "run.safetensors"
    shutil.copy(store.verified("e4t.safetensors"), other)
    common = ["--methods", "e4t-0", "--subjects", "1", "--contexts", "1", "--samples", "1", "--steps", "2"]
    assert eval_main(common + ["--e4t", str(other), "--out", str(tmp_path / "a")]) == 0
    settings = json.loads((tmp_path / "a" / "eval.json").read_text())["settings"]
    assert settings["overrides"] == {"e4t": str(other)}
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises((FormatError, ValueError), match="bad.safetensors"):
        eval_main(common + ["--e4t", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "b")])


def test_quicktune_1photo_tunes_on_the_one_photo_e4t_gets(monkeypatch):
    import boothkit.hosts.diffusers.quicktune as host
    from boothkit.toyworld.methods import METHODS, ToyEnv

    env = ToyEnv.load(sample_steps=2)
    subject = make_subjects(1, 3, 0)[0]
    seen = {}

    def spy(model, images, noun, masks=None, **kw):
        seen["images"], seen["masks"] = images, masks
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(host, "quick_tune", spy)
    with pytest.raises(RuntimeError, match="stop after the call"):
        METHODS["quicktune-1photo"](env, subject, 0)
    assert torch.equal(seen["images"], subject.images[:1]) and torch.equal(seen["masks"], subject.masks[:1])
    with pytest.raises(RuntimeError, match="stop after the call"):
        METHODS["quicktune"](env, subject, 0)
    assert seen["images"].shape[0] == 3, "the default keeps every photo"


def test_shipped_e4t_file_carries_the_settings_of_its_config():
    """The toy E4T file was trained, and its tune defaults written, by training/configs/e4t_toy.toml: every
    [method] key of the file's recorded settings, and the config fields the tune reads, equal the toml's."""
    import tomllib
    from pathlib import Path

    from boothkit.backend.e4t import load_e4t
    from boothkit.toyworld import store

    toml = tomllib.loads((Path(__file__).parents[1] / "training/configs/e4t_toy.toml").read_text())["method"]
    e4t = load_e4t(store.verified("e4t.safetensors"), family="toy")
    assert {k: e4t.config.extra["settings"][k] for k in toml} == toml
    shared = set(toml) & set(vars(e4t.config))
    assert {"reg_background", "tune_lr", "tune_max_timestep"} <= shared
    for key in shared:
        assert getattr(e4t.config, key) == toml[key], key


def test_paired_compares_two_methods_subject_by_subject_over_tables(tmp_path, capsys):
    from boothkit.toyworld.evaluate import paired

    def table(ids, a, b, **settings):
        return {"methods": {"e4t-15": {"identity_per_subject": a}, "quicktune": {"identity_per_subject": b}},
                "settings": {"subject_ids": ids, "references": 3, "contexts": 8, "samples_per_prompt": 1, "seed": 0,
                             "sample_steps": 25, **settings}}

    held, dev = table([1, 2], [0.5, 0.9], [0.7, 0.8]), table([3, 4], [0.6, 0.4], [0.9, 0.5], dev=True)
    r = paired([held, dev], "e4t-15", "quicktune")
    d = np.array([-0.2, 0.1, -0.3, -0.1])
    assert r["subjects"] == 4 and r["a_above"] == 1
    assert r["identity_a"] == pytest.approx(0.6) and r["identity_b"] == pytest.approx(0.725)
    assert r["difference"] == pytest.approx(d.mean())
    assert r["difference_se"] == pytest.approx(d.std(ddof=1) / 2)
    with pytest.raises(ValueError, match=r"each subject once: subjects \[2\]"):
        paired([held, table([2, 5], [0.1, 0.2], [0.3, 0.4])], "e4t-15", "quicktune")
    with pytest.raises(ValueError, match="drawn alike"):
        paired([held, table([3, 4], [0.1, 0.2], [0.3, 0.4], seed=1)], "e4t-15", "quicktune")
    with pytest.raises(ValueError, match="has no row 'e4t-60'"):
        paired([held], "e4t-60", "quicktune")
    files = []
    for name, t in (("a.json", held), ("b.json", dev)):
        (tmp_path / name).write_text(json.dumps(t))
        files.append(str(tmp_path / name))
    assert eval_main(["--paired", "e4t-15", "quicktune", "--tables", *files]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == r


def test_paired_versus_compares_one_method_across_two_tables_of_the_same_subjects(tmp_path, capsys):
    """Two files of one method write rows of one name; --versus reads B's row from the other table."""
    from boothkit.toyworld.evaluate import paired

    def table(ids, ib, seed=0, overrides=None):
        return {"methods": {"instantbooth": {"identity_per_subject": ib}},
                "settings": {"subject_ids": ids, "references": 3, "contexts": 4, "samples_per_prompt": 1,
                             "seed": seed, "sample_steps": 25, "overrides": overrides}}

    new = [table([1, 2], [0.7, 0.9], overrides={"instantbooth": "new.safetensors"}),
           table([3, 4], [0.6, 0.5], overrides={"instantbooth": "new.safetensors"})]
    old = [table([1, 2], [0.6, 0.6]), table([3, 4], [0.7, 0.2])]
    r = paired(new, "instantbooth", "instantbooth", versus=old)
    d = np.array([0.1, 0.3, -0.1, 0.3])
    assert r["subjects"] == 4 and r["a_above"] == 3
    assert r["difference"] == pytest.approx(d.mean()) and r["difference_se"] == pytest.approx(d.std(ddof=1) / 2)
    assert paired(new, "instantbooth", "instantbooth")["difference"] == 0, "without versus a row meets itself"
    assert "context_difference" not in r, "rows without per-subject context margins compare identity only"
    for t, c in zip(new + old, ([0.10, 0.12], [0.14, 0.10], [0.12, 0.12], [0.13, 0.14])):
        t["methods"]["instantbooth"]["context_per_subject"] = c
    rc = paired(new, "instantbooth", "instantbooth", versus=old)
    dc = np.array([-0.02, 0.0, 0.01, -0.04])
    assert rc["context_a"] == pytest.approx(0.115) and rc["context_b"] == pytest.approx(0.1275)
    assert rc["context_difference"] == pytest.approx(dc.mean())
    assert rc["context_difference_se"] == pytest.approx(dc.std(ddof=1) / 2)
    assert rc["difference"] == r["difference"]
    del old[1]["methods"]["instantbooth"]["context_per_subject"]  # one table from before: no context comparison
    assert "context_difference" not in paired(new, "instantbooth", "instantbooth", versus=old)
    with pytest.raises(ValueError, match="one table per --tables table"):
        paired(new, "instantbooth", "instantbooth", versus=old[:1])
    with pytest.raises(ValueError, match="same subjects and draw"):
        paired(new, "instantbooth", "instantbooth", versus=[old[1], old[0]])
    with pytest.raises(ValueError, match="same subjects and draw"):
        paired(new[:1], "instantbooth", "instantbooth", versus=[table([1, 2], [0.6, 0.6], seed=1)])
    files = {}
    for name, t in (("new0", new[0]), ("new1", new[1]), ("old0", old[0]), ("old1", old[1])):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(t))
    assert eval_main(["--paired", "instantbooth", "instantbooth", "--tables", str(files["new0"]), str(files["new1"]),
                      "--versus", str(files["old0"]), str(files["old1"])]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == paired(new, "instantbooth", "instantbooth", versus=old)
    assert "old0.json" in out[0] and "+0.150" in out[0]
    with pytest.raises(SystemExit):
        eval_main(["--versus", str(files["old0"])])
    assert "give --paired A B with it" in capsys.readouterr().err


def test_table_and_development_contexts_are_disjoint_draws():
    for seed in (0, 1):
        table, dev = eval_contexts(25, seed), eval_contexts(25, seed, dev=True)
        assert len(set(table)) == 25 and not set(table) & set(dev), "distinct contexts, no context in both"
        assert eval_contexts(16, seed) == table[:16]
    assert eval_contexts(16, 0) != eval_contexts(16, 1)
    with pytest.raises(ValueError, match="asked for 26"):
        eval_contexts(26, 0)


def test_instantbooth_ablations_alpha_guidance_and_training_identities_run_on_one_subject(tmp_path):
    common = ["--subjects", "1", "--contexts", "1", "--samples", "1", "--steps", "2"]
    assert eval_main(["--methods", "instantbooth", "instantbooth-token", "instantbooth-adapters",
                      "--out", str(tmp_path / "a")] + common) == 0
    assert eval_main(["--methods", "instantbooth", "--alpha", "1", "--adapters-on-uncond", "no",
                      "--out", str(tmp_path / "b")] + common) == 0
    assert eval_main(["--methods", "instantbooth", "--split", "train", "--out", str(tmp_path / "c")] + common) == 0
    a, b, c = (json.loads((tmp_path / d / "eval.json").read_text()) for d in "abc")
    rows = a["methods"]
    assert len({rows[m]["identity"] for m in rows}) == 3, "the token alone and the adapters alone differ"
    assert b["settings"]["overrides"] == {"alpha": 1.0, "adapters_on_uncond": False}
    assert c["settings"]["split"] == "train"
    assert c["settings"]["subject_ids"] == [domain.identities("train")[0].id]
    assert (tmp_path / "c" / "eval.md").read_text().startswith("Training toy-world identities")


def test_adapters_on_the_conditional_half_leave_the_unconditional_prediction_alone():
    from boothkit.hosts.diffusers.instantbooth import InstantBoothHooks, encode_images
    from boothkit.toyworld.methods import ToyEnv

    env = ToyEnv.load(sample_steps=2)
    ib, subject = env.instantbooth, make_subjects(1, 1, 0)[0]
    concept = ib.encode(*encode_images(env.vision, subject.images, subject.masks, ib))
    x = torch.randn(2, 3, 32, 32)
    ctx = env.encode(["", "a photo of a kitten"])
    with torch.no_grad():
        plain = env.base.unet(x, 500, encoder_hidden_states=ctx).sample
        with InstantBoothHooks(env.base.unet, ib, concept.f_p, 1.0, cond_only=True):
            half = env.base.unet(x, 500, encoder_hidden_states=ctx).sample
        with InstantBoothHooks(env.base.unet, ib, concept.f_p, 1.0):
            both = env.base.unet(x, 500, encoder_hidden_states=ctx).sample
    assert torch.allclose(half[0], plain[0], atol=1e-6), "the unconditional half is the base's"
    assert torch.allclose(half[1], both[1], atol=1e-5), "the conditional half is the full adapters'"
    assert not torch.allclose(both[0], plain[0])


def test_instantbooth_checks_write_their_tables(tmp_path, monkeypatch):
    from boothkit.toyworld import ib_checks

    # small sizes: the check's code paths, not its figures
    monkeypatch.setattr(ib_checks, "TIMESTEPS", (500,))
    real_loss, real_norms, real_probes = ib_checks.conditioning_loss, ib_checks.residual_norms, ib_checks.probes
    monkeypatch.setattr(ib_checks, "conditioning_loss",
                        lambda env, ib, split, seed=0: real_loss(env, ib, split, n_ids=2, seed=seed, timesteps=(500,)))
    monkeypatch.setattr(ib_checks, "residual_norms",
                        lambda env, ib, seed=0: real_norms(env, ib, n_subjects=1, n_contexts=1, seed=seed))
    monkeypatch.setattr(ib_checks, "probes", lambda env, ib, seed=0: real_probes(env, ib, 1, 1, seed))
    assert eval_main(["--instantbooth-checks", "--steps", "2", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "checks.json").read_text())
    loss = r["conditioning_train"]["loss"]
    assert set(loss) >= {"same render", "other renders (N=3)", "another identity", "beta=0 (token only)"}
    assert len(r["adapters"]) == 11 and all(a["residual_over_y"] > 0 for a in r["adapters"])
    assert set(r["probes"]["chance"]) == set(ib_checks.ATTRIBUTES)
    assert "Linear probes" in (tmp_path / "checks.md").read_text()


def test_shipped_instantbooth_file_is_in_the_manifest_and_carries_its_config():
    """The toy InstantBooth file passes the manifest's sha256 check, and was trained by the config its manifest
    entry names: every [method] key of that toml equals the file's recorded settings (sampling settings changed
    after training are listed in the entry's command and skipped here)."""
    import re
    import tomllib
    from pathlib import Path

    from boothkit.backend.instantbooth import load_instantbooth
    from boothkit.toyworld import store

    path = store.verified("instantbooth.safetensors")
    entry = json.loads((path.parent / "MANIFEST.json").read_text())["instantbooth.safetensors"]
    configs = re.findall(r"--config (\S+\.toml)", entry["reproduce"])
    assert configs, "the manifest names the command and config"
    toml = tomllib.loads((Path(__file__).parents[1] / configs[-1]).read_text())["method"]
    ib = load_instantbooth(path, family="toy")
    # files trained before these settings existed behaved as these values
    settings = {"augment_order": "before_crop", "hue_jitter": 0.05, "init_from": "", "adapters_on_uncond": True,
                **ib.config.extra["settings"]}
    after = set(re.findall(r"then set (\w+)", entry["reproduce"]))
    assert {k: settings[k] for k in toml if k not in after} == {k: v for k, v in toml.items() if k not in after}
    assert (ib.config.beta, ib.config.start_percent) == (toml["beta_inference"], toml["start_percent_inference"]), \
        "the sampling settings the config names are the file's"


def test_the_old_random_context_draw_stays_available_for_old_tables():
    rng = np.random.default_rng(17)
    assert eval_contexts(3, 0, draw="random") == [domain.random_context(rng) for _ in range(3)]
    assert eval_contexts(3, 0, dev=True, draw="random") == eval_contexts(3, 0, draw="random")


def test_base_from_lends_the_base_row_of_a_table_of_the_same_draw(tmp_path):
    common = ["--subjects", "2", "--contexts", "1", "--samples", "1", "--steps", "2"]
    assert eval_main(["--methods", "base", "--out", str(tmp_path / "base")] + common) == 0
    base_table = str(tmp_path / "base" / "eval.json")
    assert eval_main(["--methods", "instantbooth", "--beta", "0.5", "--base-from", base_table,
                      "--out", str(tmp_path / "ib")] + common) == 0
    base, ib = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("base", "ib"))
    assert list(ib["methods"]) == ["base", "instantbooth"] and ib["methods"]["base"] == base["methods"]["base"]
    row = ib["methods"]["instantbooth"]
    assert row["context_vs_base"] == pytest.approx(row["context"] / base["methods"]["base"]["context"])
    assert row["context_vs_base_se"] is not None and row["context_vs_base_se"] >= 0
    assert ib["settings"]["base_from"] == base_table and ib["settings"]["overrides"] == {"beta": 0.5}
    with pytest.raises(ValueError, match="same subjects and draw"):  # another seed: refused before scoring
        eval_main(["--methods", "instantbooth", "--seed", "1", "--base-from", base_table,
                   "--out", str(tmp_path / "s1")] + common)
    assert not (tmp_path / "s1").exists()
    with pytest.raises(ValueError, match="without base"):
        eval_main(["--methods", "base", "instantbooth", "--base-from", base_table, "--out", str(tmp_path / "x")]
                  + common)
    no_base = {**ib, "methods": {"instantbooth": row}}
    (tmp_path / "nobase.json").write_text(json.dumps(no_base))
    with pytest.raises(ValueError, match="has no base row"):
        eval_main(["--methods", "instantbooth", "--base-from", str(tmp_path / "nobase.json"),
                   "--out", str(tmp_path / "y")] + common)
