"""VQA answer normalisation (medjax/data/vqa_answers.py) rule by rule as the original's `normalize_word`
(prepro/glossary.py): punctuation, periods, number words, articles, contractions; and the JSONL answer
vocabulary built with it."""
import json

import pytest

from medjax.data.vqa_answers import CONTRACTIONS, normalize_answer, normalize_word
from medjax.tasks import ptunifier_finetune_data as finetune_data


@pytest.mark.parametrize("answer,expected", [
    ("Yes", "yes"), ("two", "2"), ("None", "0"), ("ten", "10"),            # number words -> digits ("none" is 0)
    ("the left lung", "left lung"), ("an  mri", "mri"),                     # articles dropped, spaces collapsed
    ("dont know", "don't know"), ("isnt it", "isn't it"), ("yall'll", "y'all'll"),  # contractions restored
    ("somebody'd", "somebodyd"),                                            # the table's one reversed entry
    ("x-ray", "x ray"), ("mri/ct", "mri ct"), ("right-sided (pa view)", "right sided pa view"),  # marks -> space
    ("left, right", "left right"), ("left , right", "left right"),          # a mark touching a space is deleted
    ("1,000 ml", "1000 ml"), ("x-ray 1,000", "xray 1000"),                  # digit,digit: every mark deleted
    ("2.5 cm", "2.5 cm"), ("ct scan.", "ct scan"), ("what?", "what"),      # decimal points stay, periods go
])
def test_normalize_word_as_the_original(answer, expected):
    assert normalize_answer(answer) == expected
    assert normalize_word(answer.lower()) == expected


def test_contraction_table():
    assert len(CONTRACTIONS) == 118  # the original's 120 entries less its two identities (let's, she's)
    assert CONTRACTIONS["couldnt've"] == CONTRACTIONS["couldn'tve"] == "couldn't've"
    assert "couldntve" not in CONTRACTIONS and "lets" not in CONTRACTIONS


def test_answer_vocabulary_uses_the_original_normalisation(tmp_path):
    rows = [{"answer": "Two"}, {"answer": "2"}, {"answer": "The X-ray."}, {"answer": "x ray"}, {"answer": "dont"}]
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert finetune_data.answer_vocabulary(str(tmp_path / "vqa.jsonl")) == ["2", "x ray", "don't"]
