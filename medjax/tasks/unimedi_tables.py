"""UniMedI's evaluation tables in the paper's layout (He et al., ECCV 2024, Sec. 4): one row per method (here
per evaluated checkpoint), column groups per dataset and protocol.

- Linear classification: 2D (multi-label X-ray findings, AUC) and 3D (CT classification, accuracy), each at
  1% / 10% / 100% of the training labels, as the paper's CheXpert / RSNA / COVIDx and CC-CCII tables are laid out.
- Zero-shot classification by prompts: AUC, 2D and 3D.
- Image <-> report retrieval: R@1 / R@5 for image->report and report->image, 2D and 3D.
All values in %. A metric a run did not produce (e.g. no labels in a split) shows as "-".
"""
from __future__ import annotations

import math

Columns = list[tuple[str, dict[str, float]]]


def _fraction_label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def probe_key(kind: str, fraction: float, metric: str) -> str:
    """The task's result key: ("2d", 0.01, "auc") -> "2d_probe1_auc"."""
    return f"{kind}_probe{fraction * 100:g}_{metric}"


def _cell(results: dict[str, float], key: str, scale: float) -> str:
    value = results.get(key)
    if value is None or not math.isfinite(float(value)):
        return "-"
    return f"{scale * float(value):.2f}"


def _table(title: str, exp: str, columns: Columns, groups: list[tuple[str, list[tuple[str, str, float]]]]) -> list[str]:
    """groups: (group header, [(sub-header, result key, scale)]); one row per (checkpoint label, results)."""
    if not any(key in results for _, results in columns for _, cells in groups for _, key, _ in cells):
        return []
    heads = [f"{group} {sub}" for group, cells in groups for sub, _, _ in cells]
    lines = [f"**{title}**", "", "| Method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for label, results in columns:
        cells = [_cell(results, key, scale) for _, group_cells in groups for _, key, scale in group_cells]
        lines.append(f"| medjax {exp} ({label}) | " + " | ".join(cells) + " |")
    return lines + [""]


def results_table(exp: str, columns: Columns, label_fractions) -> str:
    """Markdown: linear classification (2D AUC, 3D ACC at each label fraction), zero-shot AUC, retrieval R@K."""
    fractions = [float(f) for f in label_fractions]
    probe = [("2D (AUC)", [(_fraction_label(f), probe_key("2d", f, "auc"), 100.0) for f in fractions]),
             ("3D (ACC)", [(_fraction_label(f), probe_key("3d", f, "accuracy"), 100.0) for f in fractions])]
    zero_shot = [("2D", [("AUC", "2d_zero_shot_auc", 100.0)]), ("3D", [("AUC", "3d_zero_shot_auc", 100.0)])]
    retrieval = [(kind.upper(), [(f"{direction} R@{k}", f"{kind}_{key}_r{k}", 1.0)
                                 for key, direction in (("tr", "image->report"), ("ir", "report->image"))
                                 for k in (1, 5)]) for kind in ("2d", "3d")]
    lines = (_table("Linear classification (% of training labels)", exp, columns, probe)
             + _table("Zero-shot classification", exp, columns, zero_shot)
             + _table("Image-report retrieval (R@K, %)", exp, columns, retrieval))
    return "\n".join(lines).rstrip()
