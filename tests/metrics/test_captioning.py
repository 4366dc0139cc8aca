"""BLEU-1..4 and ROUGE-L of generated reports (medjax/metrics/captioning.py) against the package itself
(pycocoevalcap's Bleu / Rouge on the same tokens) and hand computations on known strings; the PTB
tokenizer (java) and its Python stand-in on report text."""
import math
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.rouge.rouge import Rouge

from medjax.metrics.captioning import caption_scores, ptb_tokenize, simple_tokenize

REFS = ["the heart size is normal . no pleural effusion or pneumothorax .",
        "there is a small red circle in the upper left region .",
        "mild pulmonary edema , unchanged from ___ ."]
HYPS = ["heart size is normal . no effusion .",
        "there is a red circle in the upper left .",
        "no acute cardiopulmonary process ."]


def test_scores_equal_pycocoevalcap_on_the_same_tokens():
    gts = {str(i): [r] for i, r in enumerate(REFS)}
    res = {str(i): [h] for i, h in enumerate(HYPS)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    got = caption_scores(REFS, HYPS, pretokenized=True)
    assert got == pytest.approx({"bleu_1": bleu[0], "bleu_2": bleu[1], "bleu_3": bleu[2], "bleu_4": bleu[3],
                                 "rouge_l": rouge})


def test_hand_computed_bleu_and_rouge_l():
    ref, hyp = "a b c d e f", "a b c x"
    got = caption_scores([ref], [hyp], pretokenized=True)
    bp = math.exp(1 - 6 / 4)  # hypothesis shorter than the reference
    assert got["bleu_1"] == pytest.approx(bp * 3 / 4, rel=1e-6)
    assert got["bleu_2"] == pytest.approx(bp * math.sqrt(3 / 4 * 2 / 3), rel=1e-6)
    lcs, beta = 3, 1.2  # LCS "a b c"; pycocoevalcap's beta
    p, r = lcs / 4, lcs / 6
    assert got["rouge_l"] == pytest.approx((1 + beta ** 2) * p * r / (r + beta ** 2 * p))
    assert caption_scores([ref], [ref], pretokenized=True)["bleu_4"] == pytest.approx(1.0)


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer is Stanford CoreNLP's jar: needs java")
def test_simple_tokenizer_matches_ptb_on_report_text():
    texts = ["There is a small red circle in the upper left region.",
             "No acute cardiopulmonary process; heart size is normal (stable).",
             "The patient's lungs are clear, 2.5 cm nodule. Mild-to-moderate effusion. Don't see it at 10:30.",
             "Compared to ___, the NG tube has been removed.  Left PICC ends in the SVC.",
             "Findings consistent with CHF, i.e. pulmonary edema; e.g., mild [sic] and/or \"quoted\" ... end--"]
    ptb = ptb_tokenize(texts)
    assert ptb[1] == "no acute cardiopulmonary process heart size is normal -lrb- stable -rrb-"  # kept, lower-cased
    assert simple_tokenize(texts) == ptb
    assert caption_scores(REFS, HYPS, tokenizer="ptb") == caption_scores(REFS, HYPS, tokenizer="simple")
