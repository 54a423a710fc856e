"""Read the chosen option out of free generated text, and score predictions.

Why: models rarely answer a multiple-choice question with exactly one letter. They write "B.",
"(B) the dog", "The answer is B", or repeat the option's text. `parse_choice` accepts all of
these, in order of how explicit they are, and returns None rather than guessing when the text
names no option. A lone capital "A" followed by a lowercase word is read as the article, not as
option A ("A man walks in").
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

LETTERS = string.ascii_uppercase

_LEADING = re.compile(r"^[^\w(]*\(?([A-Z])\)?(?![\w'])")
_STATED = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*[:：]?\s*\(?([A-Z])\)?(?![\w'])")
_PARENTHESIZED = re.compile(r"\(([A-Z])\)")
_LONE = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")
_OPTION = re.compile(r"^\s*\(?([A-Z])\s*[.):]\s*(.*)$", re.S)


def split_option(text: str) -> tuple[str | None, str]:
    """("B", "a dog") for "B. a dog" / "(B) a dog" / "B) a dog"; (None, text) without a letter."""
    m = _OPTION.match(text)
    return (m.group(1), m.group(2).strip()) if m else (None, text.strip())


def format_options(options: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def _article(text: str, m: re.Match) -> bool:
    return m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end():]) is not None


def parse_choice(text: str, options: Sequence[str]) -> str | None:
    """The option letter a generated answer names, or None."""
    valid = LETTERS[: len(options)]
    text = text.strip()
    for pattern in (_LEADING, _STATED, _PARENTHESIZED):
        for m in pattern.finditer(text):
            if m.group(1) in valid and not _article(text, m):
                return m.group(1)
    said = f" {_normalize(text)} "
    named = [i for i, option in enumerate(options) if _normalize(option) and f" {_normalize(option)} " in said]
    if named:  # the longest option text wins ("red car" over "car")
        longest = max(len(_normalize(options[i])) for i in named)
        best = [i for i in named if len(_normalize(options[i])) == longest]
        if len(best) == 1:
            return LETTERS[best[0]]
    lone = {m.group(1) for m in _LONE.finditer(text) if m.group(1) in valid and not _article(text, m)}
    return lone.pop() if len(lone) == 1 else None


def matches_open_answer(prediction: str, answer: str) -> bool:
    """Open-ended answers: the normalized reference appears as whole words in the prediction."""
    reference = _normalize(answer)
    return bool(reference) and f" {reference} " in f" {_normalize(prediction)} "
