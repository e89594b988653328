"""Captions of the text-to-image model ``mnist-sd`` and the tokenizer that reads them.

The tokenizer is a standard ``CLIPTokenizer`` (byte-pair encoding) over a vocabulary written
here: every lower-case letter and digit (so any lower-case text tokenizes), and whole-word
tokens for the words of the caption templates, made by merging each word left to right.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MAX_TOKENS = 16

# {w}: the digit as a word, {d}: as a numeral
TEMPLATES = (
    "a handwritten {w}",
    "the digit {d}",
    "the digit {w}",
    "a {w}",
    "{d}",
    "the number {w}",
    "an image of the digit {d}",
    "a handwritten digit {d}",
)
#: the evaluation's fixed prompts: these templates for each digit (in the model's sampling file)
EVAL_TEMPLATES = ("a handwritten {w}", "the digit {d}")


def caption(label: int, g: torch.Generator) -> str:
    k = int(torch.randint(len(TEMPLATES), (), generator=g))
    return TEMPLATES[k].format(w=DIGIT_WORDS[label], d=label)


def eval_prompts() -> tuple[list[str], list[int]]:
    """The fixed prompt list (one per digit and template) and each prompt's digit."""
    prompts, labels = [], []
    for template in EVAL_TEMPLATES:
        for d, w in enumerate(DIGIT_WORDS):
            prompts.append(template.format(w=w, d=d))
            labels.append(d)
    return prompts, labels


def _words() -> list[str]:
    words = set(DIGIT_WORDS) | {str(d) for d in range(10)}
    for t in TEMPLATES:
        words |= {w for w in t.split() if not w.startswith("{")}
    return sorted(words)


def vocabulary() -> tuple[list[str], list[tuple[str, str]]]:
    """The tokens and the byte-pair merges of the tokenizer."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in _words():
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        cur = symbols[0]
        for s in symbols[1:]:
            if (cur, s) not in merges:
                merges.append((cur, s))
            cur += s
            if cur not in vocab:
                vocab.append(cur)
    return vocab, merges


def write_vocabulary(directory: str) -> None:
    """``vocab.json`` and ``merges.txt``: what ``CLIPTokenizer`` is built from (and what the
    tokenizer's older Python implementation reads)."""
    vocab, merges = vocabulary()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def build_tokenizer():
    import transformers

    with tempfile.TemporaryDirectory() as d:
        write_vocabulary(d)
        return transformers.CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                                          model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")
