"""Classes and partial-label templates of the CLIP-Driven Universal Model (Liu et al., ICCV 2023,
arXiv 2301.00785; the original's `utils/utils.py` TEMPLATE and ORGAN_NAME).

Data only. Class ids are 1-based (0 is background) in the paper's order; channel c - 1 of the
model's 32 outputs is class c. A dataset id is the two-character prefix of a case's relative path
("01_Multi-Atlas_Labeling/img/img0001.nii.gz" -> "01"); Medical Segmentation Decathlon cases
("10_Decathlon/Task03_Liver/...") take the task number too ("10_03"). Label files hold these class
ids (the layout the original's `label_transfer.py` produces): a dataset's template lists the
classes it annotates, and only those get a loss; every other class is unlabelled for its cases.
"""
from __future__ import annotations

NUM_CLASSES = 32

# Short names for tables (1-based class c is CLASS_NAMES[c - 1]).
CLASS_NAMES = (
    "Spleen", "Right Kidney", "Left Kidney", "Gall Bladder", "Esophagus",
    "Liver", "Stomach", "Aorta", "Postcava", "Portal Vein and Splenic Vein",
    "Pancreas", "Right Adrenal Gland", "Left Adrenal Gland", "Duodenum", "Hepatic Vessel",
    "Right Lung", "Left Lung", "Colon", "Intestine", "Rectum",
    "Bladder", "Prostate", "Left Head of Femur", "Right Head of Femur", "Celiac Trunk",
    "Kidney Tumor", "Liver Tumor", "Pancreas Tumor", "Hepatic Vessel Tumor", "Lung Tumor",
    "Colon Tumor", "Kidney Cyst",
)

# The strings the released text embeddings were computed from: `PROMPT_TEMPLATE.format(name)`
# with the original's spellings, typos included ("Arota", "Celiac Truck"); the released weights
# were trained with these embeddings (original `pretrained_weights/clip_embedding.py`).
PROMPT_TEMPLATE = "A computerized tomography of a {}"
PROMPT_NAMES = (
    "Spleen", "Right Kidney", "Left Kidney", "Gall Bladder", "Esophagus",
    "Liver", "Stomach", "Arota", "Postcava", "Portal Vein and Splenic Vein",
    "Pancreas", "Right Adrenal Gland", "Left Adrenal Gland", "Duodenum", "Hepatic Vessel",
    "Right Lung", "Left Lung", "Colon", "Intestine", "Rectum",
    "Bladder", "Prostate", "Left Head of Femur", "Right Head of Femur", "Celiac Truck",
    "Kidney Tumor", "Liver Tumor", "Pancreas Tumor", "Hepatic Vessel Tumor", "Lung Tumor",
    "Colon Tumor", "Kidney Cyst",
)

# Dataset id -> the classes its labels annotate (1-based), in the original's order; dataset names
# from the original README where it names them.
TEMPLATES: dict[str, tuple[int, ...]] = {
    "01": tuple(range(1, 15)),  # BTCV (Multi-Atlas Labeling)
    "01_2": (1, 3, 4, 5, 6, 7, 11, 14),  # in the original's table; no path maps to it
    "02": (1, 3, 4, 5, 6, 7, 11, 14),  # Pancreas-CT (TCIA)
    "03": (6,),  # CHAOS
    "04": (6, 27),  # LiTS
    "05": (2, 3, 26, 32),  # KiTS
    "06": (1, 2, 3, 4, 6, 7, 11, 16, 17),  # 3D-IRCADb
    "07": (6, 1, 3, 2, 7, 4, 5, 11, 14, 18, 19, 12, 13, 20, 21, 23, 24),  # WORD
    "08": (6, 2, 3, 1, 11),  # AbdomenCT-1K
    "09": (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 21, 22),  # AMOS
    "12": (6, 21, 16, 17, 2, 3),
    "13": (6, 2, 3, 1, 11, 8, 9, 7, 4, 5, 12, 13, 25),
    "14": (11, 28),
    "10_03": (6, 27),  # MSD Task03 Liver
    "10_06": (30,),  # MSD Task06 Lung
    "10_07": (11, 28),  # MSD Task07 Pancreas
    "10_08": (15, 29),  # MSD Task08 Hepatic Vessel
    "10_09": (1,),  # MSD Task09 Spleen
    "10_10": (31,),  # MSD Task10 Colon
}

TUMOUR_CLASSES = frozenset(range(26, 33))  # 26..32: the six tumours and the kidney cyst

# A tumour voxel also counts as its organ (the original's label_transfer: LiTS/MSD liver tumours are
# liver, KiTS tumours and cysts are kidney, MSD pancreas tumours are pancreas). Kidney lesions go
# to the kidney (right 2 / left 3) nearest to them.
TUMOUR_ORGANS: dict[int, tuple[int, ...]] = {26: (2, 3), 27: (6,), 28: (11,), 32: (2, 3)}

# Training crops: these datasets sample crop centres by class ratio 1:1:5 (background : organ :
# tumour) instead of positive:negative 2:1 (original `dataset/dataloader.py`, Compose_Select).
CLASS_RATIO_CROP_DATASETS = frozenset({"04", "10_03", "10_07", "10_08"})
# These get the random zoom (p 0.3, factor 1.3-1.5) before cropping (original RandZoomd_select).
ZOOM_DATASETS = frozenset({"10_03", "10_06", "10_07", "10_08", "10_09", "10_10"})


def _check() -> None:
    assert len(CLASS_NAMES) == len(PROMPT_NAMES) == NUM_CLASSES
    for key, classes in TEMPLATES.items():
        assert len(set(classes)) == len(classes) and all(1 <= c <= NUM_CLASSES for c in classes), key


_check()
