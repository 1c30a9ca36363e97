import pytest
import torch

from boothkit.backend.identifier import class_nouns_for, find_identifier_rows, inject_concept, insert_identifier


def test_insert_before_class_noun():
    assert insert_identifier("a photo of a woman on a beach") == "a photo of a sks woman on a beach"
    assert insert_identifier("Two Kittens playing", class_nouns=class_nouns_for("cat")) == "Two sks Kittens playing"
    assert insert_identifier("a photo of a robot", "xyz", class_nouns_for("robot")) == "a photo of a xyz robot"


def test_insert_keeps_existing_identifier_and_rejects_prompt_without_noun():
    assert insert_identifier("sks man in snow") == "sks man in snow"
    with pytest.raises(ValueError, match=r"neither the identifier 'sks' nor a class noun.*cat, kitten"):
        insert_identifier("a red car", class_nouns=class_nouns_for("cat"))


def test_insert_matches_whole_words_only():
    # "catalog" must not be taken for "cat"
    assert insert_identifier("a catalog and a cat", class_nouns=["cat"]) == "a catalog and a sks cat"


def test_rows_in_any_chunk():
    ident = 42
    chunks = [[49406] + [1] * 75 + [49407], [49406, 5, ident, 6] + [49407] * 73]
    assert find_identifier_rows(chunks, [ident]) == [77 + 2]
    # chunk length comes from the chunks, not a constant 77
    assert find_identifier_rows([[0, ident, 2], [0, 7, ident]], [ident]) == [1, 5]


def test_multi_token_identifier_is_an_error():
    with pytest.raises(ValueError, match="single token.*3 tokens"):
        find_identifier_rows([[1, 2, 3]], [5, 6, 7])


def test_alpha_scales_exactly_the_identifier_rows():
    cond = torch.randn(2, 154, 16)
    f_c = torch.randn(16)
    out = inject_concept(cond, [3, 80], f_c, alpha=0.4)
    assert torch.equal(out[:, 3], (0.4 * f_c).expand(2, -1))
    assert torch.equal(out[:, 80], (0.4 * f_c).expand(2, -1))
    keep = [i for i in range(154) if i not in (3, 80)]
    assert torch.equal(out[:, keep], cond[:, keep])
    assert not torch.equal(out, cond)
    # alpha is a plain scale: doubling alpha doubles the injected rows
    assert torch.allclose(inject_concept(cond, [3], f_c, 0.8)[:, 3], 2 * out[:, 3])


def test_inject_errors():
    cond = torch.randn(1, 77, 16)
    with pytest.raises(ValueError, match="no identifier rows"):
        inject_concept(cond, [], torch.randn(16), 0.4)
    with pytest.raises(ValueError, match="24 channels but the encoded prompt has 16"):
        inject_concept(cond, [1], torch.randn(24), 0.4)
    with pytest.raises(ValueError, match=r"rows \[77\] are outside"):
        inject_concept(cond, [77], torch.randn(16), 0.4)


def test_identifier_lookalikes_are_an_error_where_it_goes_and_a_note_elsewhere():
    from boothkit.backend.identifier import check_prompt_identifier, lookalikes

    nouns = ["cat", "robot"]
    assert lookalikes("a skz cat, ssk, sk, sks, asks, skis", "sks") == ["asks", "sk", "skis", "skz", "ssk"]
    assert lookalikes("a ski trip", "sks", known=["ski"]) == [], "a known word is not a typo"
    with pytest.raises(ValueError, match="prompt word 'skz' looks like the identifier 'sks'.*'a photo of a skz sks cat'"):
        check_prompt_identifier("a photo of a skz cat", "sks", nouns)
    prompt, notes = check_prompt_identifier("a photo of a cat on ssk", "sks", nouns)
    assert prompt == "a photo of a sks cat on ssk" and len(notes) == 1 and "'ssk'" in notes[0]
    assert check_prompt_identifier("a photo of a sks cat on skz", "sks", nouns) == ("a photo of a sks cat on skz", []), \
        "with the identifier written, a look-alike elsewhere is the user's business"
    assert check_prompt_identifier("a photo of a cat", "sks", nouns) == ("a photo of a sks cat", [])


def test_toy_world_names_the_words_its_captions_never_use():
    from boothkit.toyworld import domain

    assert domain.unknown_words("a photo of a sks cat on the beach at night", ["sks"]) == ["beach"]
    assert domain.unknown_words("A Photo of a dog on SNOW with a hat, a dog") == ["dog", "hat"]
    assert domain.unknown_words("a picture of a kitten on sand at day with a flower") == []
