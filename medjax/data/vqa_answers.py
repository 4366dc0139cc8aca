"""VQA answer normalisation as PTUnifier's `make_arrow_vqa` applies it (`prepro/glossary.py:normalize_word`,
the VQA evaluation's answer processing, Antol et al., ICCV 2015), rule for rule:

1. each punctuation mark of PUNCTUATION is deleted where it touches a space or the answer holds a
   digit-comma-digit group, else replaced by a space;
2. periods not followed by a digit are deleted (the original passes `re.UNICODE` where `re.sub`'s count
   goes, so at most 32 of them: kept here);
3. lower case, split on whitespace, number words to digits ("none" and "zero" -> "0", ..., "ten" -> "10"),
   articles dropped, contractions written without apostrophes restored ("dont" -> "don't");
4. joined by single spaces and the remaining commas removed.

The caller lower-cases first (`normalize_word(str(answer).lower())` in the original).
"""
from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written in the original (a look-ahead, not a look-behind)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")

# The VQA evaluation's contraction table, written as its canonical forms: every form with one apostrophe
# left out maps back to it ("couldnt've" and "couldn'tve" -> "couldn't've"); plus the table's one reversed
# entry, "somebody'd" -> "somebodyd". Capitalised forms never match (the answer is lower-cased first).
_CANONICAL = (
    "'ow's'at 'twas I'd've I'm I've ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't "
    "hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am might've mightn't "
    "mightn't've must've mustn't needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've wasn't we'd've "
    "we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've "
    "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll you're "
    "you've").split()


def _contractions() -> dict[str, str]:
    table = {}
    for form in _CANONICAL:
        for i, c in enumerate(form):
            if c == "'":
                table[form[:i] + form[i + 1:]] = form
    table["somebody'd"] = "somebodyd"
    return table


CONTRACTIONS = _contractions()


def normalize_word(token: str) -> str:
    """The original's `normalize_word` (module docstring)."""
    out = token
    touching_digits = _DIGIT_COMMA_DIGIT.search(token) is not None
    for p in PUNCTUATION:
        if p + " " in token or " " + p in token or touching_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=32)
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words).replace(",", "")


def normalize_answer(answer) -> str:
    """An answer as the original's vocabulary holds it: normalize_word(str(answer).lower())."""
    return normalize_word(str(answer).lower())
