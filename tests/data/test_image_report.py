"""Image-report data: JSONL manifests and the original's Arrow files read alike; the dependency-free
Arrow reader/writer; one random sentence per sample, reproducible per seed; bad rows and unreadable
images reported by file and line; the Grain pipeline resumes exactly; the demo generator."""
import io
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from medjax.data.readers.arrow_ipc import ArrowFormatError, read_arrow
from medjax.data.readers.arrow_write import write_arrow
from medjax.data.readers.fundus_genome import DataError
from medjax.data.readers.image_report import (CLIP_MEAN, CLIP_STD, ImageReportDataset, clip_transform, load_tokenizer,
                                      pick_sentence, split_into_sents, tokenize)
from medjax.data.pipelines.image_report import PretrainingTransform, pretraining_train_data

CAPTIONS = [["A red circle is seen. No effusion. Heart size is normal."],
            ["There is a blue square in the upper left. The lungs are clear."],
            ["Fig. 2: CT of the chest. A 2.5 cm mass, e.g. in the left lobe.", "Second report. Two sentences."],
            ["Single sentence without a stop"],
            ["Green cross. Yellow ring. Faint triangle."],
            ["Large diamond! Small dot?"]]
SPLITS = ["train", "train", "train", "train", "val", "test"]


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20 + 2 * i, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same six image-report rows as a JSONL manifest + PNGs and as an Arrow file, plus a tokenizer."""
    from medjax.data.demo.image_report import train_tokenizer

    root = tmp_path_factory.mktemp("image_report")
    os.makedirs(root / "images")
    rows = []
    for i, (caps, split) in enumerate(zip(CAPTIONS, SPLITS)):
        (root / "images" / f"{i}.png").write_bytes(_png(i))
        rows.append({"image": f"images/{i}.png", "captions": caps, "image_id": f"id{i}", "split": split})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_arrow(str(root / "pairs.arrow"), {"image": [_png(i) for i in range(6)], "caption": CAPTIONS,
                                            "image_id": [f"id{i}" for i in range(6)], "split": SPLITS})
    train_tokenizer([c for caps in CAPTIONS for c in caps] * 4, str(root / "tokenizer"), vocab_size=300)
    return root


def test_jsonl_and_arrow_read_alike(corpus):
    jsonl = ImageReportDataset(str(corpus / "manifest.jsonl"))
    arrow = ImageReportDataset(str(corpus / "pairs.arrow"))
    assert len(jsonl) == len(arrow) == 7 and jsonl.num_images == arrow.num_images == 6  # one sample per caption
    assert jsonl.index[2:4] == [(2, 0), (2, 1)]
    for k in range(len(jsonl)):
        a, b = jsonl[k], arrow[k]
        assert a["caption"] == b["caption"] and (a["image_index"], a["caption_index"]) == (b["image_index"], b["caption_index"])
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert jsonl.image_ids == arrow.image_ids == [f"id{i}" for i in range(6)]
    np.testing.assert_array_equal(np.asarray(jsonl[0]["image"]), np.asarray(Image.open(io.BytesIO(_png(0)))))
    train = ImageReportDataset([str(corpus / "manifest.jsonl"), str(corpus / "pairs.arrow")], split="train")
    assert train.num_images == 8 and len(train) == 10 and train.where(4) == f"{corpus / 'pairs.arrow'}: row 0"
    assert ImageReportDataset(str(corpus / "manifest.jsonl"), split="test").captions == [CAPTIONS[5]]


def test_arrow_writer_reader_round_trip_and_layout(tmp_path):
    columns = {"image": [b"\x89PNG", b"", None], "caption": [["a.", "b"], [], None], "image_id": ["x", "y", "z"],
               "answer_labels": [[[1, 2], [3]], [[4]], [[]]], "score": [1.0, None, 2.5], "flag": [True, False, None],
               "n": [1, -2, 3], "nothing": [None, None, None]}
    path = str(tmp_path / "t.arrow")
    write_arrow(path, columns)
    table = read_arrow(path)
    assert table.column_names == list(columns) and table.num_rows == 3
    for name, values in columns.items():
        assert list(table[name]) == values, name
    raw = open(path, "rb").read()
    assert raw[:8] == b"ARROW1\0\0" and raw[-6:] == b"ARROW1"  # file magic, footer length, magic
    footer = struct.unpack_from("<i", raw, len(raw) - 10)[0]
    assert 0 < footer < len(raw) and struct.unpack_from("<I", raw, 8)[0] == 0xFFFFFFFF  # continuation marker
    import pickle
    assert pickle.loads(pickle.dumps(table))["caption"][0] == ["a.", "b"]  # re-opens its memory map
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ArrowFormatError, match="bad.arrow"):
        read_arrow(str(tmp_path / "bad.arrow"))


def test_sentence_split_and_pick():
    assert split_into_sents("Fig. 2: CT of the chest. A 2.5 cm mass, e.g. in the left lobe. Dr. Smith agrees!") == [
        "CT of the chest.", "A 2.5 cm mass, e.g. in the left lobe.", "Dr. Smith agrees!"]
    assert pick_sentence("One. Two.", None) == "One. Two."
    picks = {pick_sentence("One. Two. Three.", np.random.default_rng(s)) for s in range(40)}
    assert picks == {"One.", "Two.", "Three."}


def test_one_random_sentence_reproducible_per_seed(corpus):
    transform = PretrainingTransform(str(corpus / "tokenizer"), image_size=16, max_length=64)
    example = ImageReportDataset(str(corpus / "manifest.jsonl"))[0]
    tok = transform.tokenizer
    first = transform(example, np.random.default_rng([3, 0]))
    again = transform(example, np.random.default_rng([3, 0]))
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    sentences = set(split_into_sents(CAPTIONS[0][0]))
    seen = set()
    for seed in range(30):
        out = transform(example, np.random.default_rng([seed, 0]))
        text = tok.decode(out["text_ids"][out["text_mask"] == 1], skip_special_tokens=True).strip()
        assert text in sentences
        seen.add(text)
        assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.float32
        assert ((out["text_labels_mlm"] == -100) | (out["text_labels_mlm"] == out["text_ids"])).all()
    assert seen == sentences  # every sentence gets drawn
    plain = transform(example)  # evaluation: whole caption, centre crop, seeded mask
    text = tok.decode(plain["text_ids"][plain["text_mask"] == 1], skip_special_tokens=True).strip()
    assert text == " ".join(sorted(sentences, key=CAPTIONS[0][0].index))


def test_clip_transform_resize_crop_normalise():
    image = np.zeros((40, 20, 3), np.uint8)
    image[10:30] = 255  # the middle half (rows 10..29) is white
    out = clip_transform(Image.fromarray(image), 10)  # shorter side 20 -> 10, 40 -> 20, centre crop rows 5..14
    white = (1.0 - CLIP_MEAN) / CLIP_STD
    assert out.shape == (10, 10, 3)
    np.testing.assert_allclose(out[2:8], np.broadcast_to(white, (6, 10, 3)), atol=1e-5)
    grey = np.broadcast_to(np.round(CLIP_MEAN * 255).astype(np.uint8), (12, 12, 3)).copy()
    np.testing.assert_allclose(clip_transform(Image.fromarray(grey), 12), 0.0, atol=0.01)
    crop = clip_transform(Image.fromarray(image), 10, np.random.default_rng(0), resized_crop=True)
    assert crop.shape == (10, 10, 3)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_bad_rows_and_unreadable_images_name_file_and_line(corpus, tmp_path):
    good = json.dumps({"image": str(corpus / "images" / "0.png"), "captions": ["ok."]})
    m = _write(tmp_path / "a.jsonl", [good, good, '{"image": "x.png", "captions": ["a"]'])
    with pytest.raises(DataError, match=r"a\.jsonl: line 3: not a JSON object"):
        ImageReportDataset(m)
    m = _write(tmp_path / "b.jsonl", [good, json.dumps({"captions": ["a"]})])
    with pytest.raises(DataError, match=r"b\.jsonl: line 2: missing field 'image'"):
        ImageReportDataset(m)
    m = _write(tmp_path / "c.jsonl", [json.dumps({"image": str(corpus / "images" / "0.png"), "captions": [1]})])
    with pytest.raises(DataError, match=r"c\.jsonl: line 1: field 'captions' must be a non-empty list of strings"):
        ImageReportDataset(m)
    m = _write(tmp_path / "d.jsonl", [good, json.dumps({"image": "missing.png", "captions": ["a"]})])
    with pytest.raises(DataError, match=r"d\.jsonl: line 2: field 'image': file .*missing\.png not found"):
        ImageReportDataset(m)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    m = _write(tmp_path / "e.jsonl", [good, json.dumps({"image": "broken.png", "captions": ["a."]})])
    dataset = ImageReportDataset(m)  # images are decoded on access ...
    with pytest.raises(DataError, match=r"e\.jsonl: line 2 \(.*broken\.png\): field 'image' is not a readable image"):
        dataset[1]
    with pytest.raises(DataError, match=r"e\.jsonl: line 2 .*not a readable image"):  # ... or all up front
        ImageReportDataset(m, verify_images=True)
    write_arrow(str(tmp_path / "f.arrow"), {"image": [_png(0), b"junk"], "caption": [["a."], ["b."]]})
    with pytest.raises(DataError, match=r"f\.arrow: row 1: field 'image' is not a readable image"):
        ImageReportDataset(str(tmp_path / "f.arrow"))[1]
    m = _write(tmp_path / "g.jsonl", [json.dumps({"image": str(corpus / "images" / "0.png"), "captions": ["a"],
                                                  "split": "training"})])
    with pytest.raises(DataError, match=r"g\.jsonl: line 1: field 'split' = 'training'"):
        ImageReportDataset(m)


def test_pipeline_resumes_exactly(corpus):
    dataset = ImageReportDataset(str(corpus / "manifest.jsonl"))
    transform = PretrainingTransform(str(corpus / "tokenizer"), image_size=8, max_length=16)
    make = lambda: iter(pretraining_train_data(dataset, transform, global_batch=2, seed=5, prefetch_threads=0))  # noqa: E731
    it = make()
    for _ in range(5):  # past the first epoch (7 samples = 3 batches)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert sorted(got) == ["image", "text_ids", "text_ids_mlm", "text_labels_mlm", "text_mask"]
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_demo_generator(tmp_path):
    from medjax.data.demo.image_report import COLOURS, SHAPES, make_image_report_demo
    from medjax.tasks.ptunifier_finetune_data import MultiLabelDataset, NLIDataset, VQADataset

    root = make_image_report_demo(str(tmp_path / "demo"), num_images=20, image_size=32)
    assert os.path.isfile(os.path.join(root, ".complete"))
    manifest = ImageReportDataset(os.path.join(root, "manifest.jsonl"))
    arrow = ImageReportDataset([os.path.join(root, "arrow", f"image_report_{s}.arrow") for s in ("train", "val", "test")])
    assert manifest.num_images == 20 and sorted(manifest.captions) == sorted(arrow.captions)
    assert {r["split"] for r in map(manifest.row, range(20))} == {"train", "val", "test"}
    for i in range(20):  # every report names a colour and shape the image holds
        caption, image = manifest.captions[i][0], np.asarray(manifest.load_image(i))
        assert any(s in caption for s in SHAPES) and image.shape == (32, 32, 3)
        for sentence in split_into_sents(caption):  # pretraining reads one sentence: each names a finding
            assert any(s in sentence for s in SHAPES) and any(c in sentence for c in COLOURS), sentence
    vqa = VQADataset(os.path.join(root, "vqa.jsonl"), "train")
    assert {"yes", "no"} <= set(vqa.answers) and len(vqa) == 6 * 16  # 2 closed + 4 open questions per image
    assert {int(vqa[k]["answer_type"]) for k in range(len(vqa))} == {0, 1}
    cls = MultiLabelDataset(os.path.join(root, "classification.jsonl"), "train")
    assert cls.labels.shape == (16, len(SHAPES)) and (cls.labels.sum(1) >= 1).all()
    nli = NLIDataset(os.path.join(root, "nli.jsonl"), "test")
    assert len(nli) == 2 and nli[0]["label"] in (0, 1, 2)
    tok = load_tokenizer(os.path.join(root, "tokenizer"))
    assert (tok.cls_token_id, tok.pad_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 1, 2, 4)
    ids = tok("There is a red circle in the upper left.")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and tok.unk_token_id not in ids
    assert make_image_report_demo(root, num_images=20, image_size=32) == root  # complete: skipped


def test_whole_word_masking_through_the_pretraining_transform(corpus):
    transform = PretrainingTransform(str(corpus / "tokenizer"), image_size=16, max_length=64, whole_word_masking=True,
                                     mlm_probability=0.5)
    example = ImageReportDataset(str(corpus / "manifest.jsonl"))[0]
    enc = tokenize(transform.tokenizer, "Small opacities in the left lower lobe.", 64, word_ids=True)
    assert enc["word_ids"].shape == (64,) and (enc["word_ids"][enc["special_tokens_mask"] == 1] == -1).all()
    for seed in range(10):
        out = transform(example, np.random.default_rng([seed, 0]))
        again = tokenize(transform.tokenizer, transform.tokenizer.decode(
            out["text_ids"][out["text_mask"] == 1], skip_special_tokens=True).strip(), 64, word_ids=True)
        np.testing.assert_array_equal(again["input_ids"], out["text_ids"])  # the sentence the transform picked
        words = again["word_ids"]
        chosen = out["text_labels_mlm"] != -100
        for w in set(words[words >= 0].tolist()):
            assert len(set(chosen[words == w].tolist())) == 1  # a word is masked whole or not at all
