"""The dependency-free Arrow IPC reader (medjax/data/readers/arrow_ipc.py) on files written by pyarrow
itself - `pa.RecordBatchFileWriter` as the originals' make_arrow.py, and the stream writer - with the
originals' column types, several record batches and nulls; the fine-tuning sets (image-report, VQA, NLI,
MELINDA) read from such files give what their JSONL twins give."""
import io
import json

import numpy as np
import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow")  # in the test extra (setup.cfg)

from medjax.data.readers.arrow_ipc import ArrowFormatError, read_arrow  # noqa: E402
from medjax.data.readers.image_report import ImageReportDataset  # noqa: E402
from medjax.tasks import ptunifier_finetune_data as finetune_data  # noqa: E402


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, table, *, stream=False, chunk=None, **options):
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.RecordBatchStreamWriter if stream else pa.RecordBatchFileWriter)(
            sink, table.schema, options=pa.ipc.IpcWriteOptions(**options) if options else None)
        with writer:
            writer.write_table(table, max_chunksize=chunk)


COLUMNS = {
    "image": [_png(10), _png(20), _png(30), _png(40), _png(50)],
    "caption": [["a red circle."], ["two findings.", "second caption"], ["c"], ["d"], ["e"]],
    "image_id": ["0", "1", None, "3", "4"],
    "answer_labels": [[[1, 2]], [[0], [3, 4]], [], [[5]], [[6]]],
    "answer_scores": [[[1.0, 0.5]], [[1.0], [0.3, 0.6]], [], [[1.0]], [[0.25]]],
    "label": pa.array([0, 1, 2, 1, 0], pa.int32()),
    "flag": [True, False, None, True, False],
    "score": pa.array([0.5, 1.5, None, 3.5, 4.5], pa.float32()),
    "large_text": pa.array(["x", "yy", "", "zzzz", None], pa.large_string()),
    "split": ["train", "train", "val", "test", "train"],
}


@pytest.mark.parametrize("stream,chunk", [(False, None), (False, 2), (True, 2)])
def test_reader_gives_pyarrows_values(tmp_path, stream, chunk):
    table = pa.table(COLUMNS)
    path = tmp_path / "t.arrow"
    _write(path, table, stream=stream, chunk=chunk)
    got = read_arrow(str(path))
    assert got.column_names == table.column_names and got.num_rows == 5
    expected = table.to_pylist()
    for name in table.column_names:
        values = [got[name][i] for i in range(5)]
        want = [row[name] for row in expected]
        if name == "score":
            np.testing.assert_allclose([np.nan if v is None else v for v in values],
                                       [np.nan if v is None else v for v in want])
        else:
            assert [v.tolist() if isinstance(v, np.ndarray) else v for v in values] == want, name


def test_compressed_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "zstd.arrow"
    _write(path, pa.table({"caption": [["a"]]}), compression="zstd")
    with pytest.raises(ArrowFormatError, match="zstd.arrow"):
        read_arrow(str(path)).to_pylist()


def test_finetuning_sets_from_pyarrow_files(tmp_path):
    images = [_png(60), _png(70)]
    (tmp_path / "a.png").write_bytes(images[0])
    (tmp_path / "b.png").write_bytes(images[1])
    # image-report pairs (pretraining / retrieval)
    _write(tmp_path / "roco_train.arrow", pa.table({
        "image": images, "caption": [["one caption."], ["first.", "second."]], "image_id": ["a", "b"],
        "split": ["train", "train"]}))
    pairs = ImageReportDataset(str(tmp_path / "roco_train.arrow"), split="train")
    assert [pairs[i]["caption"] for i in range(len(pairs))] == ["one caption.", "first.", "second."]
    assert np.asarray(pairs[2]["image"]).mean() == pytest.approx(70, abs=1)
    # NLI: the original's Arrow label ids equal the JSONL names' order
    names = ["contradiction", "entailment", "neutral"]
    _write(tmp_path / "nli_train.arrow", pa.table({
        "text_a": [["p0"], ["p1"], ["p2"]], "text_b": [["h0"], ["h1"], ["h2"]], "label": [2, 0, 1],
        "split": ["train"] * 3}))
    (tmp_path / "nli.jsonl").write_text("".join(json.dumps({"text_a": f"p{i}", "text_b": f"h{i}", "label": names[k],
                                                            "split": "train"}) + "\n" for i, k in enumerate([2, 0, 1])))
    arrow = finetune_data.NLIDataset(str(tmp_path / "nli_train.arrow"), "train")
    jsonl = finetune_data.NLIDataset(str(tmp_path / "nli.jsonl"), "train")
    assert [arrow[i] for i in range(3)] == [jsonl[i] for i in range(3)]
    assert [int(arrow[i]["label"]) for i in range(3)] == [2, 0, 1]
    # VQA: per-image question lists with soft answer labels
    _write(tmp_path / "vqa_train.arrow", pa.table({
        "image": images, "questions": [["is it red?"], ["what shape?", "where?"]],
        "answer_labels": [[[0]], [[2], [1, 3]]], "answer_scores": [[[1.0]], [[1.0], [0.5, 0.5]]],
        "answer_type": [[0], [1, 1]], "split": ["train", "train"]}))
    vqa = finetune_data.VQADataset(str(tmp_path / "vqa_train.arrow"), "train", num_answers=4)
    assert [vqa[i]["question"] for i in range(3)] == ["is it red?", "what shape?", "where?"]
    np.testing.assert_array_equal(vqa[2]["target"], [0.0, 0.5, 0.0, 0.5])
    # MELINDA: one label per caption
    _write(tmp_path / "cls_melinda_train.arrow", pa.table({
        "image": images, "caption": [["fig a"], ["fig b"]], "i_meth": [[3], [1]], "split": ["train", "train"]}))
    melinda = finetune_data.ImageTextLabelDataset(str(tmp_path / "cls_melinda_train.arrow"), "train",
                                                  label_column="i_meth")
    assert [(melinda[i]["caption"], int(melinda[i]["label"])) for i in range(2)] == [("fig a", 3), ("fig b", 1)]
    # MIMIC-CXR report generation
    _write(tmp_path / "clm_train.arrow", pa.table({
        "image": images, "caption": [["findings a."], ["findings b."]], "findings": [["findings a."], ["findings b."]],
        "impression": [["impr a."], ["impr b."]], "split": ["train", "train"]}))
    reports = finetune_data.ReportDataset(str(tmp_path / "clm_train.arrow"), "train")
    assert reports.texts("impression") == ["impr a.", "impr b."] and reports[1]["findings"] == "findings b."
