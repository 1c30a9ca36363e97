"""The identifier (the paper's \\hat{V}, "sks" by default): where it goes in a prompt, where its rows are in an
encoded prompt, and the concept token α·f_c that replaces them (InstantBooth paper, eq. 6)."""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch

DEFAULT_IDENTIFIER = "sks"
DEFAULT_TEMPLATE = "a photo of {identifier} {class_noun}"  # the tuning methods' training prompt (two-stage paper)
TOY_TEMPLATE = "a photo of a {identifier} {class_noun}"  # the toy base's caption style ("a photo of a cat ...")

# Per-category class nouns: the identifier is inserted right before the first of these in a prompt.
CLASS_NOUNS: dict[str, list[str]] = {
    "person": ["person", "man", "woman", "girl", "boy", "lady", "gentleman", "baby", "child", "kid", "guy",
               "people", "human", "face"],
    "cat": ["cat", "kitten", "kitty"],
    "dog": ["dog", "puppy", "doggy"],
    "toy": ["toy", "figurine", "plush", "doll"],
}


def class_nouns_for(category: str | None, extra: Sequence[str] = ()) -> list[str]:
    """Nouns that mark the subject. ``category=None`` means every known category."""
    if category is None:
        nouns = [n for ns in CLASS_NOUNS.values() for n in ns]
    elif category in CLASS_NOUNS:
        nouns = list(CLASS_NOUNS[category])
    else:
        nouns = [category]  # an unknown category is its own class noun ("robot")
    return nouns + [n for n in extra if n not in nouns]


def insert_identifier(prompt: str, identifier: str = DEFAULT_IDENTIFIER, class_nouns: Sequence[str] | None = None) -> str:
    """Insert ``identifier`` before the first class noun: "a photo of a cat" -> "a photo of a sks cat".

    A prompt that already contains the identifier is returned unchanged. A prompt without any class noun raises,
    because silently sending a prompt without the identifier would personalize nothing."""
    if re.search(rf"(?<!\w){re.escape(identifier)}(?!\w)", prompt, flags=re.IGNORECASE):
        return prompt
    nouns = list(class_nouns) if class_nouns is not None else class_nouns_for(None)
    # longest first, so that "kitten" wins over "kit"-like prefixes; whole words only, plural "s" allowed
    pattern = r"(?<!\w)(" + "|".join(re.escape(n) for n in sorted(nouns, key=len, reverse=True)) + r")s?(?!\w)"
    m = re.search(pattern, prompt, flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"prompt {prompt!r} contains neither the identifier {identifier!r} nor a class noun "
                         f"(one of: {', '.join(nouns)}); write the identifier into the prompt or name the subject.")
    return prompt[: m.start()] + identifier + " " + prompt[m.start():]


def find_identifier_rows(chunks: Sequence[Sequence[int]], identifier_ids: Sequence[int], chunk_length: int | None = None) -> list[int]:
    """Rows of the identifier in an encoded prompt made of token chunks.

    ``chunks`` are the token ids of each chunk (as fed to the text encoder, start/end tokens included); the encoded
    prompt is their concatenation, so the token at chunk c, index i is row ``c * chunk_length + i``. The chunk length
    is taken from the chunks themselves, never assumed to be 77."""
    if len(identifier_ids) != 1:
        raise ValueError(f"the identifier must be a single token for this tokenizer, but it is {len(identifier_ids)} "
                         f"tokens {list(identifier_ids)}; choose a rare single-token word such as 'sks'.")
    ident = int(identifier_ids[0])
    rows = []
    offset = 0
    for chunk in chunks:
        length = chunk_length if chunk_length is not None else len(chunk)
        rows.extend(offset + i for i, t in enumerate(chunk) if int(t) == ident)
        offset += length
    return rows


def inject_concept(cond: torch.Tensor, rows: Sequence[int], f_c: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return a copy of ``cond`` [B, T, C] whose ``rows`` are replaced by α·f_c; every other value is untouched.

    ``f_c`` is [C] (one concept for the whole batch) or [B, C]."""
    if cond.ndim != 3:
        raise ValueError(f"encoded prompt must be [batch, tokens, channels], got shape {tuple(cond.shape)}")
    if not rows:
        raise ValueError("the encoded prompt has no identifier rows to replace; the prompt must contain the identifier.")
    if f_c.shape[-1] != cond.shape[-1]:
        raise ValueError(f"concept token has {f_c.shape[-1]} channels but the encoded prompt has {cond.shape[-1]}: "
                         f"the InstantBooth file was trained for another text encoder width.")
    bad = [r for r in rows if not 0 <= r < cond.shape[1]]
    if bad:
        raise ValueError(f"identifier rows {bad} are outside the encoded prompt of {cond.shape[1]} tokens.")
    out = cond.clone()
    token = (alpha * f_c).to(dtype=cond.dtype, device=cond.device)
    if token.ndim == 1:
        token = token.expand(cond.shape[0], -1)
    idx = torch.as_tensor(list(rows), device=cond.device)
    out[:, idx] = token[:, None, :].expand(-1, len(rows), -1)
    return out


_IDENTIFIER_OK = re.compile(r"^[\w.\-]+$")


def check_identifier(identifier: str, class_noun: str | None = None) -> str:
    """An identifier is one word (letters, digits, '_', '.', '-'), not the class noun itself."""
    if not isinstance(identifier, str) or not _IDENTIFIER_OK.match(identifier):
        raise ValueError(f"identifier {identifier!r} must be a single word of letters, digits, '_', '.' or '-' "
                         f"(e.g. 'sks'); it names the embedding and marks the subject in prompts")
    if class_noun is not None and identifier.lower() == class_noun.lower():
        raise ValueError(f"identifier {identifier!r} equals the class noun; choose a rare word such as 'sks'")
    return identifier


def training_template(family: str) -> str:
    """The tuning methods' training prompt for a base family: the paper's, or the toy base's caption style."""
    return TOY_TEMPLATE if family == "toy" else DEFAULT_TEMPLATE


def _one_edit_apart(a: str, b: str) -> bool:
    """One substitution, insertion, deletion or swap of two neighbours turns ``a`` into ``b`` (a != b)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def lookalikes(prompt: str, identifier: str, known: Sequence[str] = ()) -> list[str]:
    """Words of ``prompt`` one typing slip away from ``identifier`` ("skz", "ssk" for "sks"), leaving out the
    ``known`` words (a vocabulary's real words: "ski" is a word, not a typo)."""
    if len(identifier) < 3:
        return []
    ident = identifier.lower()
    skip = {w.lower() for w in known}
    words = re.findall(r"[\w.\-]+", prompt.lower())
    return sorted({w for w in words if w not in skip and _one_edit_apart(w, ident)})


def check_prompt_identifier(prompt: str, identifier: str, class_nouns: Sequence[str], known: Sequence[str] = ()
                            ) -> tuple[str, list[str]]:
    """The prompt with the identifier (:func:`insert_identifier`) and the notes to show. A look-alike of the
    identifier right where it would be inserted ("a photo of a skz cat") is a typo that would give "a skz sks cat":
    an error naming the word. Look-alikes elsewhere, when the prompt lacks the identifier, are a note."""
    notes = []
    present = re.search(rf"(?<!\w){re.escape(identifier)}(?!\w)", prompt, flags=re.IGNORECASE)
    near = [] if present else lookalikes(prompt, identifier, known)
    out = insert_identifier(prompt, identifier, class_nouns)
    if near:
        start = out.lower().find(identifier.lower() + " ") if out != prompt else -1
        before = re.findall(r"[\w.\-]+", out[:start].lower())[-1:] if start >= 0 else []
        if before and before[0] in near:
            raise ValueError(f"prompt word {before[0]!r} looks like the identifier {identifier!r} (a typo?): the "
                             f"prompt would read {out!r}; write {identifier!r} in its place")
        notes.append(f"prompt word(s) {', '.join(map(repr, near))} look like the identifier {identifier!r}; they are "
                     f"read as written and {identifier!r} is inserted before the class noun")
    return out, notes
