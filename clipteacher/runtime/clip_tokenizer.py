"""CLIP's byte-level BPE tokenizer without torch, for the exported CLIP text encoder.

The same algorithm as open_clip's `SimpleTokenizer` (clean "lower", truncation that keeps the
end-of-text token), whose module imports torch at the top and so cannot be used by the
torch-free runtime. `tests/test_export.py` checks that both give identical ids.

    tok = ClipTokenizer("bpe_simple_vocab_16e6.txt.gz", context_length=77)
    ids = tok(["a photo of a cat."])  # C x context_length int64, 0-padded
"""
from __future__ import annotations

import gzip
import html
from functools import lru_cache

import ftfy
import numpy as np
import regex as re

SPECIAL_TOKENS = ["<start_of_text>", "<end_of_text>"]


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode character, so BPE never sees whitespace or control bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clean(text: str) -> str:
    """open_clip's 'lower' cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    """texts -> C x context_length int64 ids: [start] + BPE(text) + [end], truncated, 0-padded."""

    def __init__(self, bpe_path: str, context_length: int = 77):
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1 : 49152 - 256 - 2 + 1]]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + SPECIAL_TOKENS
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.cache = {t: t for t in SPECIAL_TOKENS}
        self.pat = re.compile("|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                              re.IGNORECASE)
        self.sot, self.eot = self.encoder[SPECIAL_TOKENS[0]], self.encoder[SPECIAL_TOKENS[1]]
        self.context_length = int(context_length)

    def bpe(self, token: str) -> str:
        """One pre-token -> space-separated BPE symbols (the last one ends with '</w>')."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            first, second = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if (first, second) not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in re.findall(self.pat, clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        result = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > self.context_length:  # open_clip truncates and keeps the end token last
                ids = ids[: self.context_length]
                ids[-1] = self.eot
            result[i, : len(ids)] = ids
        return result
