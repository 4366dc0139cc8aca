"""UniMedI's results tables in the paper's layout: rows per checkpoint, 2D AUC / 3D ACC at 1/10/100% labels."""
from medjax.tasks.unimedi_tables import probe_key, results_table


def test_tables_in_the_papers_layout():
    run = {"2d_probe1_auc": 0.612, "2d_probe10_auc": 0.7, "2d_probe100_auc": 0.81234, "3d_probe1_accuracy": 0.5,
           "3d_probe10_accuracy": 0.55, "3d_probe100_accuracy": 0.6, "2d_zero_shot_auc": float("nan"),
           "3d_zero_shot_auc": 0.75, "2d_tr_r1": 12.5, "2d_tr_r5": 40.0, "2d_ir_r1": 10.0, "2d_ir_r5": 30.0}
    table = results_table("unimedi", [("step_100", run), ("step_200", {"2d_probe1_auc": 0.7})], (0.01, 0.1, 1.0))
    lines = table.splitlines()
    assert lines[0] == "**Linear classification (% of training labels)**"
    assert lines[2] == ("| Method | 2D (AUC) 1% | 2D (AUC) 10% | 2D (AUC) 100% | 3D (ACC) 1% | 3D (ACC) 10% | "
                        "3D (ACC) 100% |")
    assert lines[4] == "| medjax unimedi (step_100) | 61.20 | 70.00 | 81.23 | 50.00 | 55.00 | 60.00 |"
    assert lines[5] == "| medjax unimedi (step_200) | 70.00 | - | - | - | - | - |"
    assert "| medjax unimedi (step_100) | - | 75.00 |" in lines  # NaN zero-shot (no label has both classes)
    retrieval = lines[lines.index("**Image-report retrieval (R@K, %)**") + 2]
    assert retrieval.startswith("| Method | 2D image->report R@1 | 2D image->report R@5 | 2D report->image R@1 |")
    assert "| medjax unimedi (step_100) | 12.50 | 40.00 | 10.00 | 30.00 | - | - | - | - |" in lines
    assert probe_key("3d", 0.1, "accuracy") == "3d_probe10_accuracy"
