"""Universal Model evaluation: per-class Dice / NSD aggregation over cases and the paper-layout tables."""
import math

import numpy as np
import pytest

from medjax.inference.universal_eval import CLASS_KEYS, evaluate_cases, universal_results_table

SHAPE = (10, 10, 10)


def channels(**boxes):
    label = np.zeros(SHAPE + (32,), np.uint8)
    for c, (lo, hi) in boxes.items():
        label[lo:hi, lo:hi, lo:hi, int(c[1:]) - 1] = 1
    return label


def mask_of(*classes):
    m = np.zeros(32, bool)
    m[[c - 1 for c in classes]] = True
    return m


def test_evaluate_cases_scores_only_annotated_classes_with_truth():
    cases = [
        # BTCV-like case: spleen (1) exact, liver (6) half-size prediction; aorta (8) annotated but absent
        {"image": np.zeros(SHAPE, np.float32), "label": channels(c1=(0, 4), c6=(4, 8)),
         "label_mask": mask_of(1, 6, 8), "dataset_id": "01", "name": "a"},
        # liver-only dataset: liver exact; its spleen channel is not annotated, so not scored
        {"image": np.ones(SHAPE, np.float32), "label": channels(c6=(2, 6)), "label_mask": mask_of(6),
         "dataset_id": "03", "name": "b"},
    ]
    seen = []

    def predict(image, classes):
        seen.append(classes)
        pred = np.zeros(SHAPE + (32,), bool)
        if image[0, 0, 0] == 0:  # case a
            pred[0:4, 0:4, 0:4, 0] = True
            pred[4:8, 4:8, 4:6, 5] = True  # 32 of the 64 liver voxels
        else:
            pred[2:6, 2:6, 2:6, 5] = True
            pred[:, :, :, 0] = True  # unannotated spleen prediction: ignored
        return pred

    results = evaluate_cases(predict, cases, spacing=(1.5, 1.5, 1.5), nsd_tolerance_mm=1.0)
    assert seen == [(1, 6, 8), (6,)]
    liver_a = 2 * 32 / (32 + 64)
    assert results["dice/spleen"] == 1.0 and results["nsd/spleen"] == 1.0
    assert results["dice/liver"] == pytest.approx((liver_a + 1.0) / 2)
    assert results["dice/01/liver"] == pytest.approx(liver_a) and results["dice/03/liver"] == 1.0
    assert 0 < results["nsd/01/liver"] < 1
    assert "dice/aorta" not in results  # empty truth: skipped, as the original
    assert results["dice/mean"] == pytest.approx((1.0 + (liver_a + 1.0) / 2) / 2)
    assert results["cases"] == 2.0
    assert all(isinstance(v, float) and not math.isnan(v) for v in results.values())


def test_results_tables_follow_the_paper_layout():
    btcv = {f"dice/01/{CLASS_KEYS[c - 1]}": 0.5 + c / 100 for c in range(1, 14)}
    msd = {"dice/10_03/liver": 0.9, "nsd/10_03/liver": 0.8, "dice/10_03/liver_tumor": 0.7,
           "nsd/10_03/liver_tumor": 0.6, "dice/spleen": 0.95}
    table = universal_results_table("universal_swin", [("run1", {**btcv, **msd}), ("run2", btcv)])
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| Method | Spleen"))
    assert header.split(" | ")[1:] == ["Spleen", "R Kidney", "L Kidney", "Gall Bladder", "Esophagus", "Liver",
                                       "Stomach", "Aorta", "IVC/Postcava", "Veins", "Pancreas", "R Adrenal",
                                       "L Adrenal", "Avg |"]
    run1 = next(line for line in lines if line.startswith("| medjax universal_swin (run1) | 51.00"))
    assert run1.rstrip(" |").endswith(f"{100 * np.mean([0.5 + c / 100 for c in range(1, 14)]):.2f}")
    msd_row = [line for line in lines if line.startswith("| medjax universal_swin (run1)")][-1].split(" | ")
    assert msd_row[1:5] == ["90.00", "80.00", "70.00", "60.00"]
    assert msd_row[-2] == "–"  # colon tumour: not evaluated
    assert "95.00" in msd_row  # spleen Dice from the dataset-free key
    plain = universal_results_table("x", [("", {"dice/kidney_cyst": 0.25, "nsd/kidney_cyst": 0.5})])
    assert "Kidney Cyst DSC" in plain and "25.00 | 50.00" in plain


def test_cases_from_cache_reads_nifti_pairs(tmp_path):
    from medjax.data.readers.ct import save_nifti
    from medjax.data.pipelines.ct import CTCase, CTVolumeCache
    from medjax.inference.universal_eval import cases_from_cache

    hu = np.full((12, 10, 8), -1000, np.int16)
    hu[2:10, 2:8, 1:7] = 60
    label = np.zeros(hu.shape, np.uint8)
    label[3:6, 3:6, 2:5] = 6  # liver
    label[4, 4, 3] = 27  # a liver tumour voxel: also liver
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    save_nifti(str(tmp_path / "img.nii.gz"), hu, affine)
    save_nifti(str(tmp_path / "lab.nii.gz"), label, affine)
    case = CTCase(str(tmp_path / "img.nii.gz"), str(tmp_path / "lab.nii.gz"), "04", "test")
    (only,) = list(cases_from_cache([case], CTVolumeCache(str(tmp_path / "cache"))))
    assert only["image"].shape == (8, 6, 6) and only["label"].shape == (8, 6, 6, 32)  # foreground crop
    assert only["label_mask"].nonzero()[0].tolist() == [5, 26]
    assert only["label"][..., 5].sum() == 27 and only["label"][..., 26].sum() == 1
    assert only["dataset_id"] == "04"


def test_chance_is_the_whole_volume_mask_and_printed_beside_dice():
    """Issue #23: beside each Dice, the Dice of the input-blind whole-volume mask, 2|G| / (|V| + |G|)."""
    case = {"image": np.zeros(SHAPE, np.float32), "label": channels(c1=(0, 4), c6=(0, 8)),
            "label_mask": mask_of(1, 6), "dataset_id": "01", "name": "a"}
    results = evaluate_cases(lambda image, classes: np.asarray(case["label"], bool), [case], spacing=(1.5,) * 3,
                             nsd_tolerance_mm=1.5)
    assert results["dice/spleen_chance"] == pytest.approx(2 * 64 / (1000 + 64))
    assert results["dice/01/liver_chance"] == pytest.approx(2 * 512 / (1000 + 512))
    assert results["dice/mean_chance"] == pytest.approx((2 * 64 / 1064 + 2 * 512 / 1512) / 2)
    table = universal_results_table("universal_swin", [("demo", results)])
    assert f"100.00 (chance {100 * 2 * 64 / 1064:.2f})" in table
