"""Issue #15 (reliability): non-UTF-8 manifests and a corrupt `tokenizer.json` each get an error naming the
file (line, column) and what was expected, not a UnicodeDecodeError / JSONDecodeError traceback."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from medjax.data.pipelines.ct import read_ct_list
from medjax.data.errors import DataError
from medjax.data.readers.fundus_genome import FundusGenomeDataset
from medjax.data.readers.image_report import ImageReportDataset, load_tokenizer
from medjax.data.readers.plink import read_plink, write_plink
from medjax.data.readers.text_io import read_text

LATIN1 = "participant_id,eye,image_path\np1,left,img/1.png\nJos\xe9,right,img/2.png\n".encode("latin-1")


def test_read_text_names_line_column_and_byte(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(LATIN1)
    with pytest.raises(DataError, match=r"m\.csv: line 3: column 4: byte 0xe9 is not UTF-8; expected a UTF-8 "
                                        r"CSV .*iconv -f latin1"):
        read_text(path, "CSV")
    path.write_bytes("\ufeffa,b\n".encode("utf-8"))
    assert read_text(path) == "a,b\n"  # the BOM Excel writes is dropped
    path.write_bytes("a,b\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"line 1: column 1: byte 0xff .*looks like UTF-16"):
        read_text(path)


def test_latin1_fundus_manifest(tmp_path):
    os.makedirs(tmp_path / "img")
    for name in ("1", "2"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / f"{name}.png")
    (tmp_path / "manifest.csv").write_bytes(LATIN1)
    with pytest.raises(DataError, match=r"manifest\.csv: line 3: column 4: byte 0xe9 is not UTF-8; expected a "
                                        r"UTF-8 CSV manifest"):
        FundusGenomeDataset(str(tmp_path), image_size=8, genotypes=None)


def test_latin1_jsonl_ct_list_and_fam(tmp_path):
    (tmp_path / "r.jsonl").write_bytes(b'{"image": "a.png", "captions": ["ok"]}\n{"image": "b.png", "captions": '
                                       b'["pl\xe8vre"]}\n')
    with pytest.raises(DataError, match=r"r\.jsonl: line 2: column 36: byte 0xe8 is not UTF-8; expected a UTF-8 "
                                        r"JSONL manifest"):
        ImageReportDataset(str(tmp_path / "r.jsonl"))
    (tmp_path / "train.txt").write_bytes(b"01_Multi/img\xb5.nii.gz\t01_Multi/label.nii.gz\n")
    with pytest.raises(DataError, match=r"train\.txt: line 1: column 13: byte 0xb5 .*UTF-8 list file"):
        read_ct_list(str(tmp_path / "train.txt"), str(tmp_path))
    prefix = str(tmp_path / "g")
    write_plink(prefix, np.zeros((2, 3), int), ["a", "b"])
    (tmp_path / "g.fam").write_bytes(b"a a 0 0 0 -9\nb \xff 0 0 0 -9\n")
    with pytest.raises(DataError, match=r"g\.fam: line 2: column 3: byte 0xff .*UTF-8 PLINK \.fam file"):
        read_plink(prefix)


def test_corrupt_tokenizer_json(tmp_path):
    tok = tmp_path / "tok"
    os.makedirs(tok)
    (tok / "tokenizer.json").write_text('{"version": "1.0", "truncation": null, "model": {"type": "WordPiece", ')
    with pytest.raises(DataError, match=r"tok/tokenizer\.json: line 1: column 71: not valid JSON .*expected a "
                                        r"Hugging Face tokenizer\.json"):
        load_tokenizer(str(tok))
    (tok / "tokenizer.json").write_bytes(b'{"version": "1.0", "x": "\xff"}')
    with pytest.raises(DataError, match=r"tokenizer\.json: line 1: column 26: byte 0xff is not UTF-8"):
        load_tokenizer(str(tok))
    (tok / "tokenizer.json").write_text(json.dumps([1, 2]))
    with pytest.raises(DataError, match=r"tokenizer\.json: line 1: expected a JSON object"):
        load_tokenizer(str(tok))
    (tok / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Nonsense"}}))
    with pytest.raises(DataError, match=r"tok: not a loadable Hugging Face tokenizer directory .*expected "
                                        r"tokenizer\.json"):
        load_tokenizer(str(tok))
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):  # still a FileNotFoundError, and a DataError
        load_tokenizer(str(tmp_path / "absent"))
