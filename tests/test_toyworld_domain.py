"""The toy world's domain generator and tokenizer: determinism, splits, masks, captions, export."""
import json

import numpy as np
import pytest
import torch

from boothkit.toyworld import domain as d
from boothkit.toyworld import tokenizer as tk


def test_render_is_deterministic_by_seed():
    ident = d.identities("train")[3]
    ctx = d.Context("grass", "night", "ball")
    a, b = d.render(ident, ctx, 7), d.render(ident, ctx, 7)
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)
    c = d.render(ident, ctx, 8)
    assert not torch.equal(a.image, c.image)
    assert a.image.shape == (3, d.RESOLUTION, d.RESOLUTION) and a.image.dtype == torch.float32
    assert a.mask.shape == (1, d.RESOLUTION, d.RESOLUTION)
    assert 0.0 <= float(a.image.min()) and float(a.image.max()) <= 1.0
    assert set(a.mask.unique().tolist()) <= {0.0, 1.0}


def test_batch_is_deterministic():
    x1, m1, c1, i1 = d.batch("train", 32, seed=5)
    x2, m2, c2, i2 = d.batch("train", 32, seed=5)
    assert torch.equal(x1, x2) and torch.equal(m1, m2) and c1 == c2 and torch.equal(i1, i2)
    assert x1.shape == (32, 3, 32, 32) and m1.shape == (32, 1, 32, 32) and i1.dtype == torch.long
    x3 = d.batch("train", 32, seed=6)[0]
    assert not torch.equal(x1, x3), "another seed, another batch"


def test_splits_disjoint_deterministic_and_sized():
    train, held = d.identities("train"), d.identities("heldout")
    assert len(train) >= 300 and len(held) == 32
    assert train == d.identities("train")
    assert not {i.attributes for i in train} & {i.attributes for i in held}
    assert len({i.attributes for i in train}) == len(train)
    assert not {i.id for i in train} & {i.id for i in held}
    assert [i.id for i in train] == list(range(len(train)))
    for split in (train, held):
        assert {i.class_name for i in split} == set(d.CLASS_NOUNS)
    with pytest.raises(ValueError, match="unknown split"):
        d.identities("test")


def test_encoder_split_adds_identities_and_leaves_the_others_as_they_were(tmp_path):
    """The encoders' extra identities (issue #30) are disjoint from train and held-out, and adding them changed neither:
    the digest of every train and held-out identity is the one of the files shipped before the split existed."""
    import hashlib

    train, held, extra = d.identities("train"), d.identities("heldout"), d.identities("extra")
    assert len(extra) == 2 * d.N_EXTRA_PER_CLASS and d.identities("encoder") == train + extra
    attrs = {i.attributes for i in extra}
    assert len(attrs) == len(extra) and not attrs & {i.attributes for i in train + held}
    assert min(i.id for i in extra) == d.EXTRA_ID_OFFSET and d.split_of(extra[-1].id) == "extra"
    assert d.identity_by_id(extra[5].id) == extra[5]
    # encoder_all: every combination but the held-out ones, each once
    rest, every = d.identities("rest"), d.identities("encoder_all")
    assert every == train + extra + rest and len({i.attributes for i in every}) == len(every)
    assert len(every) + len(held) == sum(8 * 7 * 5 * 2 * 4 * len(d.PARTS[c]) for c in d.CLASSES)
    assert not {i.attributes for i in rest} & {i.attributes for i in held} and d.split_of(rest[0].id) == "rest"
    digest = hashlib.sha256(repr([(i.id, i.attributes) for i in train + held]).encode()).hexdigest()[:16]
    assert digest == "e4dce00614650e5c"
    d.export_folder("encoder", 40, tmp_path, seed=0)
    ids = [json.loads(x)["identity"] for x in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert {d.split_of(i) for i in ids} == {"train", "extra"}


def test_identity_details_change_pixels_not_captions():
    """Two identities differing only in one attribute render differently in the same context and seed."""
    a = d.identities("train")[0]
    from dataclasses import replace
    for field, value in (("primary", (a.primary + 1) % len(d.PALETTE)), ("eye", (a.eye + 1) % len(d.EYE_COLORS)),
                         ("pattern", "checker" if a.pattern != "checker" else "dots")):
        b = replace(a, **{field: value})
        if b.primary == b.secondary:
            continue
        ra, rb = d.render(a, d.Context("snow", "day", None), 3), d.render(b, d.Context("snow", "day", None), 3)
        assert (ra.image - rb.image).abs().sum() > 1.0, field
        assert ra.caption == rb.caption


def test_mask_matches_subject():
    """Pixels outside the mask do not depend on the identity; pixels inside do (same context and seed)."""
    ids = d.identities("train")
    a = next(i for i in ids if i.class_name == "cat" and i.primary == 0)
    b = next(i for i in ids if i.class_name == "cat" and i.primary == 3 and i.part == a.part)
    ctx = d.Context("sand", "day", "tree")
    ra, rb = d.render(a, ctx, 11), d.render(b, ctx, 11)
    assert torch.equal(ra.mask, rb.mask)
    area = ra.mask.sum().item()
    assert 60 < area < 0.5 * 32 * 32
    outside = (1 - ra.mask).bool().expand(3, -1, -1)
    # only anti-aliased edge pixels outside the hard mask may differ
    assert (ra.image - rb.image).abs()[outside].gt(0.02).float().mean() < 0.05
    inside = ra.mask.bool().expand(3, -1, -1)
    assert (ra.image - rb.image).abs()[inside].mean() > 0.1


def test_contexts_are_visible():
    ident = d.identities("train")[0]
    day = d.render(ident, d.Context("grass", "day", None), 1).image.mean()
    night = d.render(ident, d.Context("grass", "night", None), 1).image.mean()
    assert night < 0.7 * day
    grass = d.render(ident, d.Context("grass", "day", None), 2).image
    snow = d.render(ident, d.Context("snow", "day", None), 2).image
    assert grass[:, -4:].mean() < snow[:, -4:].mean() - 0.3   # bottom rows are ground
    plain = d.render(ident, d.Context("water", "day", None), 4)
    with_obj = d.render(ident, d.Context("water", "day", "box"), 4)
    assert (plain.image - with_obj.image).abs().sum() > 5.0


def test_captions_name_no_identity_attribute():
    _, _, caps, _ = d.batch("train", 200, seed=1)
    for c in caps:
        words = set(c.split())
        assert not words & d.IDENTITY_WORDS, c
        assert d.IDENTIFIER not in words
        assert words <= set(d.VOCAB)
        assert words & {n for ns in d.CLASS_NOUNS.values() for n in ns}
    assert not set(d.VOCAB) & d.IDENTITY_WORDS


def test_caption_identifier_placement_and_context_prompt():
    ctx = d.Context("grass", "night", "ball")
    assert d.caption("cat", ctx, identifier="sks") == "a photo of a sks cat on grass at night with a ball"
    assert d.context_prompt("cat", ctx) == "a photo of a cat on grass at night with a ball"
    assert d.caption("robot", d.Context("snow", "day", None), noun="droid") == "a photo of a droid on snow at day"
    rng = np.random.default_rng(0)
    for _ in range(20):
        words = d.caption("robot", ctx, identifier="sks", rng=rng).split()
        assert words[words.index("sks") + 1] in d.CLASS_NOUNS["robot"]
    import random
    assert d.random_context(random.Random(1)) == d.random_context(random.Random(1))
    with pytest.raises(ValueError, match="unknown class"):
        d.caption("dog", ctx)


def test_one_field_changes_differ_in_exactly_one_field():
    ctx = d.Context("grass", "night", "ball")
    changes = d.one_field_changes(ctx)
    fields = [(c.background != ctx.background) + (c.light != ctx.light) + (c.obj != ctx.obj) for c in changes]
    assert fields == [1] * len(changes)
    assert len(set(changes)) == len(changes) == (len(d.BACKGROUNDS) - 1) + (len(d.LIGHTS) - 1) + len(d.OBJECTS)


def test_every_vocab_word_is_one_token(tmp_path):
    tok = tk.build_tokenizer(tmp_path / "tok")
    for w in d.VOCAB:
        assert len(tok.tokenize(w)) == 1, w
    assert tok.model_max_length == 77
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id is not None
    ids = tok("a photo of a sks cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 8
    assert len(tok.tokenize("a blue cat")) > 3   # words outside the vocabulary still tokenize (into pieces)
    again = tk.load_tokenizer(tmp_path / "tok")
    assert again("a sks droid").input_ids == tok("a sks droid").input_ids


def test_tokenizer_ids_are_stable():
    """The ids the shipped models were trained with (a rebuild must not reshuffle them)."""
    tok = tk.build_tokenizer()
    assert tok("a photo of a sks cat on grass").input_ids == [581, 320, 572, 544, 320, 550, 525, 543, 569, 582]
    assert len(tok) == 583
    # the deterministic fallback for other word lists: every word one token
    vocab, merges = tk.vocab_and_merges(["alpha", "alps", "beta", "zeta"])
    assert vocab == tk.vocab_and_merges(["alpha", "alps", "beta", "zeta"])[0]
    from transformers import CLIPTokenizer
    t2 = CLIPTokenizer(vocab=vocab, merges=merges)
    assert all(len(t2.tokenize(w)) == 1 for w in ["alpha", "alps", "beta", "zeta"])


def test_export_folder_reads_back(tmp_path):
    from PIL import Image
    d.export_folder("heldout", 3, tmp_path, seed=2)
    meta = [json.loads(x) for x in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    _, masks, caps, ids = d.batch("heldout", 3, seed=2)
    assert [m["caption"] for m in meta] == caps and [m["identity"] for m in meta] == ids.tolist()
    held = {i.id: i.class_name for i in d.identities("heldout")}
    for k, m in enumerate(meta):
        assert m["file"] == f"{k:05d}.png" and m["class"] == held[m["identity"]]
        img = np.asarray(Image.open(tmp_path / m["file"]))
        assert img.shape == (32, 32, 3)
        mask = np.asarray(Image.open(tmp_path / f"{k:05d}_mask.png")) > 127
        assert np.array_equal(mask, masks[k, 0].numpy() > 0.5)
        assert (tmp_path / f"{k:05d}.txt").read_text().strip() == caps[k]


def test_export_one_identity_and_list_identities(tmp_path, capsys):
    """`boothkit toyworld export --identity ID`: the photos of that one subject (what `tune --images` takes);
    `boothkit toyworld identities` lists the ids to pick from."""
    from PIL import Image

    from boothkit.commands.toyworld import main as toyworld

    assert toyworld(["identities"]) == 0
    listed = capsys.readouterr().out.splitlines()
    held = d.identities("heldout")
    assert len(listed) == len(held) and listed[0].split()[:3] == [str(held[0].id), "heldout", held[0].class_name]
    ident = held[5]
    assert toyworld(["export", "--identity", str(ident.id), "--n", "3", "--out", str(tmp_path / "one")]) == 0
    meta = [json.loads(x) for x in (tmp_path / "one" / "metadata.jsonl").read_text().splitlines()]
    assert [m["identity"] for m in meta] == [ident.id] * 3 and {m["class"] for m in meta} == {ident.class_name}
    want = d.identity_renders(ident, 3, 0)
    for k, s in enumerate(want):
        img = np.asarray(Image.open(tmp_path / "one" / f"{k:05d}.png")).astype(np.float32) / 255
        assert np.abs(img - s.image.permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6, "the identity's renders"
        assert d.CLASS_NOUNS[ident.class_name][0] in meta[k]["caption"] or \
            d.CLASS_NOUNS[ident.class_name][1] in meta[k]["caption"]
    with pytest.raises(ValueError, match="no toy-world identity with id 999; train ids are 0..319, held-out ids "
                                         "1000..1031"):
        toyworld(["export", "--identity", "999", "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit):
        toyworld(["export", "--identity", "1000", "--split", "train", "--out", str(tmp_path / "x")])
