"""The released PTUnifier fine-tuning protocol (reference ptunifier.md): the position table resized once at
load, micro-averaged F1 as torchmetrics 0.7, NLI labels in the original's order from Arrow and JSONL alike,
fixed label-fraction subset files, clip_resizedcrop per dataset."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from sklearn.metrics import f1_score

from medjax import config as config_lib
from medjax.data.readers.arrow_write import write_arrow
from medjax.nn.vit import position_resize_matrix
from medjax.tasks import build_task
from medjax.tasks import ptunifier_finetune_data as finetune_data
from medjax.tasks.ptunifier_classification import multilabel_f1


@pytest.fixture(scope="module")
def demo_root(demo_roots):
    return demo_roots("image_report")  # the session's image-report demo (tests/experiment_data.py: 40 images, 32 px)


def test_position_table_resized_once_at_load(demo_root):
    # tiny backbone pretrained at 32 px (4x4 patches + CLS), fine-tuned at 48 px (6x6 + CLS)
    config = config_lib.get_config("ptunifier_nli", "tiny", [f"data.dir={demo_root}", "data.image_size=48"])
    task = build_task(config, log=lambda *_: None)
    assert task.model.image_size == 48
    params = nn.meta.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    assert params["vision"]["position_embedding"].shape == (37, 32)  # the checkpoint will carry the new table
    table = np.random.default_rng(0).normal(size=(17, 32)).astype(np.float32)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
    pretrained = dict(params, vision=dict(params["vision"], position_embedding=table))
    merged = task.load_pretrained(params, pretrained)
    got = np.asarray(merged["vision"]["position_embedding"])
    assert got.shape == (37, 32)
    np.testing.assert_array_equal(got[0], table[0])  # CLS position kept
    m = position_resize_matrix(4, 6)  # separable bicubic (PyTorch align_corners=False): rows then columns
    expected = np.einsum("ai,bj,ijd->abd", m, m, table[1:].reshape(4, 4, 32)).reshape(36, 32)
    np.testing.assert_allclose(got[1:], expected, rtol=1e-5, atol=1e-5)
    # today's behaviour as a switch: the table stays at the pretraining grid
    kept = build_task(config_lib.get_config("ptunifier_nli", "tiny", [
        f"data.dir={demo_root}", "data.image_size=48", "resize_position_table_at_load=False"]), log=lambda *_: None)
    assert kept.model.image_size == 32


def test_micro_f1_as_torchmetrics_default():
    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    probs = np.array([[0.9, 0.2, 0.5], [0.1, 0.6, 0.4], [0.7, 0.3, 0.2], [0.2, 0.8, 0.9]])
    got = multilabel_f1(labels, probs)
    predicted = probs >= 0.5  # torchmetrics' threshold: 0.5 itself is positive
    assert got["f1"] == pytest.approx(f1_score(labels, predicted, average="micro"))
    assert got["f1_macro"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    tp, fp, fn = (predicted & (labels == 1)).sum(), (predicted & (labels == 0)).sum(), (~predicted & (labels == 1)).sum()
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["f1"] != pytest.approx(got["f1_macro"])


def test_nli_labels_in_the_original_order_from_arrow_and_jsonl(tmp_path):
    names = ["contradiction", "entailment", "neutral", "entailment"]
    original_ids = [0, 1, 2, 1]  # the original's make_arrow: contradiction 0, entailment 1, neutral 2
    write_arrow(str(tmp_path / "nli_train.arrow"), {
        "text_a": [[f"premise {i}"] for i in range(4)], "text_b": [[f"hypothesis {i}"] for i in range(4)],
        "label": original_ids, "split": ["train"] * 4})
    with open(tmp_path / "nli.jsonl", "w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"text_a": f"premise {i}", "text_b": f"hypothesis {i}", "label": name,
                                "split": "train"}) + "\n")
    arrow = finetune_data.NLIDataset(str(tmp_path / "nli_train.arrow"), "train")
    jsonl = finetune_data.NLIDataset(str(tmp_path / "nli.jsonl"), "train")
    assert [int(arrow[i]["label"]) for i in range(4)] == [int(jsonl[i]["label"]) for i in range(4)] == original_ids


def test_label_fraction_subset_file_is_read_whole(tmp_path):
    open(tmp_path / "mlc_chexpert_train_01.arrow", "wb").close()
    assert finetune_data.resolve(str(tmp_path), "mlc_chexpert_{split}.arrow", "mlc_chexpert_train_01") == \
        os.path.join(str(tmp_path), "mlc_chexpert_train_01.arrow")
    assert finetune_data.resolve(str(tmp_path), "mlc_chexpert_{split}.arrow", "train_01") == \
        os.path.join(str(tmp_path), "mlc_chexpert_train_01.arrow")
    assert finetune_data.row_split("mlc_chexpert_train_01") is None and finetune_data.row_split("train") == "train"


def test_resized_crop_per_dataset_as_the_run_scripts():
    crops = {(exp, v): bool(config_lib.get_config(exp, v).data.resized_crop) for exp, v in (
        ("ptunifier_vqa", "full"), ("ptunifier_vqa", "slake"), ("ptunifier_vqa", "medvqa2019"),
        ("ptunifier_cls", "full"), ("ptunifier_cls", "rsna"), ("ptunifier_retrieval", "full"))}
    assert crops == {("ptunifier_vqa", "full"): False, ("ptunifier_vqa", "slake"): True,
                     ("ptunifier_vqa", "medvqa2019"): True, ("ptunifier_cls", "full"): True,
                     ("ptunifier_cls", "rsna"): True, ("ptunifier_retrieval", "full"): True}


def test_retrieval_recall_on_val_as_the_original():
    assert config_lib.get_config("ptunifier_retrieval", "full").data.eval_split == "val"
    assert config_lib.get_config("ptunifier_retrieval", "full", ["data.eval_split=test"]).data.eval_split == "test"


def test_melinda_classes_from_arrow_and_jsonl_agree(tmp_path):
    """JSONL class names are numbered in sorted order over all rows (the original's make_arrow_melinda), so a
    JSONL file and the original's Arrow file of the same data give the same labels, one per caption."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    png = (tmp_path / "a.png").read_bytes()
    methods = ["western blot", "microscopy", "pcr", "microscopy"]
    splits = ["train", "train", "test", "train"]
    with open(tmp_path / "melinda.jsonl", "w") as f:
        for i, (m, s) in enumerate(zip(methods, splits)):
            f.write(json.dumps({"image": "a.png", "caption": f"figure {i}", "p_meth": m, "split": s}) + "\n")
    write_arrow(str(tmp_path / "cls_melinda_train.arrow"), {
        "image": [png] * 3, "caption": [["figure 0"], ["figure 1"], ["figure 3"]],
        "p_meth": [[2], [0], [0]], "split": ["train"] * 3})  # sorted: microscopy 0, pcr 1, western blot 2
    jsonl = finetune_data.ImageTextLabelDataset(str(tmp_path / "melinda.jsonl"), "train", label_column="p_meth")
    arrow = finetune_data.ImageTextLabelDataset(str(tmp_path / "cls_melinda_train.arrow"), "train", label_column="p_meth")
    assert jsonl.classes == ["microscopy", "pcr", "western blot"] and jsonl.num_classes == 3
    assert [int(jsonl[i]["label"]) for i in range(3)] == [int(arrow[i]["label"]) for i in range(3)] == [2, 0, 0]
    assert [jsonl[i]["caption"] for i in range(3)] == [arrow[i]["caption"] for i in range(3)]
    with open(tmp_path / "bad.jsonl", "w") as f:
        f.write(json.dumps({"image": "a.png", "caption": "c", "split": "train"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl: line 1: missing field 'p_meth'"):
        finetune_data.ImageTextLabelDataset(str(tmp_path / "bad.jsonl"), "train", label_column="p_meth")
