"""The toy world's CLIP tokenizer: a byte-level BPE (the same pipeline as OpenAI CLIP's, via transformers'
``CLIPTokenizer``) whose merges make every word of ``domain.VOCAB`` exactly one token, so the identifier and the class
nouns behave like single CLIP tokens. Other words still tokenize, into byte pieces.

Built deterministically by :func:`build_tokenizer`; the shipped copy lives in ``weights/tokenizer`` and is loaded
through the sha256 manifest by :func:`load_tokenizer`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from . import domain, store

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FORMAT = "boothkit.toyworld.tokenizer"
TOKENIZER_VERSION = "1"
MODEL_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_INFO_FILE = "boothkit_tokenizer.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE training on ``words`` (each once, with the ``</w>`` end-of-word marker) until every word is one piece.

    Written out rather than taken from the ``tokenizers`` trainer because that one breaks ties between equally
    frequent pairs differently across versions, which changed token ids between machines. Ties here go to the
    lexicographically smallest pair, so the merges are the same everywhere; applying them in order (what BPE does)
    reproduces the training segmentation, so each word ends as a single token."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pr: (-counts[pr], pr))
        merges.append(best)
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(seq[j] + seq[j + 1])
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out


# The merges and the ids of the pieces as first shipped (learned once by the `tokenizers` BPE trainer, whose tie
# breaks are not reproducible): frozen here so that every build gives the ids the shipped models were trained with.
_FROZEN_MERGES: tuple[tuple[str, str], ...] = (
    ("r", "o"), ("a", "t</w>"), ("b", "o"), ("e", "r</w>"), ("i", "t"), ("a", "l"), ("a", "n"), ("a", "s"),
    ("a", "t"), ("a", "d</w>"), ("a", "y</w>"), ("b", "al"), ("c", "t"), ("c", "at</w>"), ("d", "ro"),
    ("d", "ay</w>"), ("e", "e</w>"), ("e", "n</w>"), ("f", "l"), ("g", "h"), ("g", "r"), ("h", "o"), ("h", "e</w>"),
    ("i", "d</w>"), ("i", "ct"), ("i", "gh"), ("k", "s</w>"), ("k", "it"), ("n", "o"), ("n", "igh"), ("o", "w"),
    ("o", "n</w>"), ("o", "f</w>"), ("p", "ho"), ("p", "ict"), ("r", "e</w>"), ("r", "ee</w>"), ("s", "an"),
    ("s", "ks</w>"), ("s", "no"), ("t", "o</w>"), ("t", "en</w>"), ("t", "he</w>"), ("t", "ree</w>"),
    ("u", "re</w>"), ("v", "v"), ("w", "x</w>"), ("w", "it"), ("w", "at"), ("z", "wx</w>"), ("ro", "bo"),
    ("ro", "ad</w>"), ("bo", "x</w>"), ("as", "s</w>"), ("bal", "l</w>"), ("dro", "id</w>"), ("fl", "ow"),
    ("gr", "ass</w>"), ("kit", "ten</w>"), ("nigh", "t</w>"), ("pho", "to</w>"), ("pict", "ure</w>"),
    ("san", "d</w>"), ("sno", "w</w>"), ("vv", "k</w>"), ("wit", "h</w>"), ("wat", "er</w>"), ("robo", "t</w>"),
    ("flow", "er</w>"),
)
_FROZEN_PIECES: tuple[str, ...] = (  # ids 512.. in order; bos and eos follow
    "ro", "at</w>", "bo", "er</w>", "it", "al", "an", "as", "at", "ad</w>", "ay</w>", "bal", "ct", "cat</w>", "dro",
    "day</w>", "ee</w>", "en</w>", "fl", "gh", "gr", "ho", "he</w>", "id</w>", "ict", "igh", "ks</w>", "kit", "no",
    "nigh", "ow", "on</w>", "of</w>", "pho", "pict", "re</w>", "ree</w>", "san", "sks</w>", "sno", "to</w>",
    "ten</w>", "the</w>", "tree</w>", "ure</w>", "vv", "wx</w>", "wit", "wat", "zwx</w>", "robo", "road</w>",
    "box</w>", "ass</w>", "ball</w>", "droid</w>", "flow", "grass</w>", "kitten</w>", "night</w>", "photo</w>",
    "picture</w>", "sand</w>", "snow</w>", "vvk</w>", "with</w>", "water</w>", "robot</w>", "flower</w>",
)
_FROZEN_WORDS = frozenset((  # the multi-letter words those tables were learned for
    "at", "ball", "box", "cat", "day", "droid", "flower", "grass", "kitten", "night", "of", "on",
    "photo", "picture", "road", "robot", "sand", "sks", "snow", "the", "tree", "vvk", "water", "with", "zwx"))


def vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges in which each of ``words`` is one token ``word</w>``.

    Ids: the 256 byte symbols, their ``</w>`` forms, the merged pieces, bos, eos. For the toy world's vocabulary the
    frozen tables above are used (the ids the shipped models know); any other word list gets deterministic merges
    from :func:`learn_merges`. The byte alphabet keeps any other text tokenizable."""
    for w in words:
        if not w.isalpha() or not w.islower() or not w.isascii():
            raise ValueError(f"vocabulary word {w!r}: expected lower-case ascii letters only")
    alphabet = list(_bytes_to_unicode().values())
    if {w for w in words if len(w) > 1} == _FROZEN_WORDS:
        merges, pieces = list(_FROZEN_MERGES), list(_FROZEN_PIECES)
    else:
        merges = learn_merges(words)
        pieces = [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for piece in alphabet + [ch + "</w>" for ch in alphabet] + pieces + [BOS, EOS]:
        vocab.setdefault(piece, len(vocab))
    return vocab, merges


def build_tokenizer(out_dir: str | Path | None = None):
    """A ``CLIPTokenizer`` in which every ``domain.VOCAB`` word is exactly one token (checked); saved to ``out_dir``
    when given (with a small ``boothkit_tokenizer.json`` carrying format/version)."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges(domain.VOCAB)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
                        model_max_length=MODEL_MAX_LENGTH)
    bad = {w: tok.tokenize(w) for w in domain.VOCAB if len(tok.tokenize(w)) != 1}
    if bad:
        raise RuntimeError(f"toy tokenizer: words that are not a single token: {bad}")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out))
        (out / _INFO_FILE).write_text(json.dumps({
            "format": TOKENIZER_FORMAT, "version": TOKENIZER_VERSION, "vocab_words": domain.VOCAB,
            "identifier": domain.IDENTIFIER, "model_max_length": MODEL_MAX_LENGTH}, indent=2) + "\n")
    return tok


def load_tokenizer(path: str | Path | None = None):
    """The shipped toy tokenizer (sha256-verified against the manifest), or the one saved in ``path``."""
    from transformers import CLIPTokenizer

    folder = Path(path) if path is not None else store.verified_dir(TOKENIZER_DIR)
    info_path = folder / _INFO_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path}: missing; expected a toy tokenizer folder written by build_tokenizer")
    info = json.loads(info_path.read_text())
    if info.get("format") != TOKENIZER_FORMAT:
        raise ValueError(f"{info_path}: field 'format' is {info.get('format')!r}, expected {TOKENIZER_FORMAT!r}")
    if info.get("version") != TOKENIZER_VERSION:
        raise ValueError(f"{info_path}: field 'version' is {info.get('version')!r}, expected {TOKENIZER_VERSION!r}")
    if info.get("vocab_words") != domain.VOCAB:
        raise ValueError(f"{info_path}: field 'vocab_words' does not match toyworld.domain.VOCAB; rebuild with "
                         f"`python -m boothkit.toyworld.train_base --tokenizer-only`")
    return CLIPTokenizer.from_pretrained(str(folder))
