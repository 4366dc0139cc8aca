"""BLEU-1..4 and ROUGE-L of generated reports (PTUnifier, Chen et al., ICCV 2023, report generation
table; the original's `COCOCaptionScore` = `compute_scores`), computed by the MS-COCO caption evaluation
code from PyPI (`pycocoevalcap`, the same Bleu / Rouge scorers the original ships a copy of):

    BLEU-n  = BP * exp(mean_{m<=n} log p_m)   corpus-level, modified m-gram precisions, brevity penalty
              against the closest reference length (Papineni et al., 2002; pycocoevalcap `option="closest"`)
    ROUGE-L = mean over reports of the LCS F-measure with beta = 1.2 (Lin, 2004; pycocoevalcap `Rouge`)

Both sides are first tokenised as the original does: Stanford CoreNLP's PTBTokenizer (`-lowerCase`,
the jar inside pycocoevalcap, run with `java`) and the punctuation tokens dropped. Where `java` is not
installed, `tokenizer="simple"` (a regex stand-in: lower case, clitics split, brackets as -lrb- / -rrb-,
punctuation dropped) is used; it agrees with PTB on report text (tests/metrics/test_captioning.py) but is
not PTB on every string.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Sequence

from medjax.errors import MedjaxInputError

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS: the PTB tokens removed after tokenising
PUNCTUATION_TOKENS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                                "--", "...", ";"])
TOKENIZERS = ("auto", "ptb", "simple")


def _package():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise MedjaxInputError("report-generation metrics need pycocoevalcap (pip install pycocoevalcap==1.2, or "
                               "pip install -e .[captioning])") from e
    return Bleu, Rouge


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer on each text (one line each), punctuation tokens removed; needs java.
    The input file goes to the system temp dir (pycocoevalcap writes it beside its jar)."""
    _package()
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    if shutil.which("java") is None:
        raise MedjaxInputError("the PTB tokenizer needs java on PATH (or set tokenizer='simple')")
    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    lines = [t.replace("\n", " ") for t in texts]
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines).encode("utf-8"))
    try:
        out = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                              "-lowerCase", f.name], check=True, capture_output=True).stdout.decode("utf-8")
    finally:
        os.remove(f.name)
    tokens = out.split("\n")[:len(lines)]
    if len(tokens) != len(lines):
        raise RuntimeError(f"PTBTokenizer returned {len(tokens)} lines for {len(lines)} texts")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATION_TOKENS) for line in tokens]


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}  # PTB, lower-cased
_SIMPLE = re.compile(r"[^\W\d_](?:\.[^\W\d_])+\.|\d+(?:[.,:/]\d+)*|[^\W_]+(?:['\-/][^\W_]+)*|_+|\S", re.UNICODE)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def simple_tokenize(texts: Sequence[str]) -> list[str]:
    """A Python stand-in for PTB + the punctuation filter on report text: lower case; abbreviations (i.e.,
    e.g.), numbers (2.5, 10:30), de-identification blanks (___),
    hyphenated and slashed words kept whole; clitics split ("patient's" -> "patient 's", "don't" ->
    "do n't"); brackets as PTB's -lrb- / -rrb- (which the original's filter keeps, being lower-cased);
    other punctuation dropped."""
    out = []
    for text in texts:
        tokens = []
        for w in _SIMPLE.findall(text.lower()):
            if w in _BRACKETS:
                tokens.append(_BRACKETS[w])
            elif re.search(r"\w", w):
                m = _CLITIC.match(w)
                tokens.extend([m.group(1), m.group(2)] if m else [w])
        out.append(" ".join(tokens))
    return out


def tokenize(texts: Sequence[str], tokenizer: str = "auto") -> list[str]:
    """`ptb` (java), `simple`, or `auto`: ptb where java is installed, else simple."""
    if tokenizer not in TOKENIZERS:
        raise MedjaxInputError(f"eval tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
    if tokenizer == "ptb" or (tokenizer == "auto" and shutil.which("java") is not None):
        return ptb_tokenize(texts)
    return simple_tokenize(texts)


def caption_scores(references: Sequence[str], hypotheses: Sequence[str], *, tokenizer: str = "auto",
                   pretokenized: bool = False) -> dict[str, float]:
    """{"bleu_1".."bleu_4", "rouge_l"} (fractions) of one hypothesis per reference, as the original's
    `compute_scores(gts={i: [ref]}, res={i: [hyp]})`."""
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need one hypothesis per reference and at least one; got {len(references)} references "
                         f"and {len(hypotheses)} hypotheses")
    Bleu, Rouge = _package()
    if not pretokenized:
        both = tokenize(list(references) + list(hypotheses), tokenizer)
        references, hypotheses = both[:len(references)], both[len(references):]
    gts = {str(i): [r] for i, r in enumerate(references)}
    res = {str(i): [h] for i, h in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    return {**{f"bleu_{n}": float(b) for n, b in enumerate(bleu, 1)}, "rouge_l": float(rouge)}
