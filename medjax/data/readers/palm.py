"""PALM, the Pathologic Myopia challenge's training set (Fu et al., ISBI 2019; `PALM-Training400`), as
ContIG's loader reads it (HealthML/ContIG `data/data_palm.py`), for MRM's segmentation transfer task
(Yang et al., ICCV 2023, Tab. 1): optic disc and atrophy masks.

Directory layout (the released `PALM-Training400` archive; `<root>` is ContIG's PALM_PATH):

    <root>/PALM-Training400/<ID>.jpg        ID = H0001 (high myopia), N0001 (normal), P0001 (pathologic myopia)
    <root>/Disc_Masks/<ID>.bmp              every image: 0 (black) = optic disc, 255 = background
    <root>/Lesion_Masks/Atrophy/<ID>.bmp    where the image has atrophy (absent = none), same convention

As ContIG: masks are read as foreground = 1 - mask / 255 (black is the structure), a missing atrophy mask is
all background; images and masks are resized to (size, size), masks by nearest neighbour, no crop; the split
is sklearn's `StratifiedShuffleSplit` on the class "ID starts with H" (seed 42 for train vs rest, seed 43 for
val vs test), 60/20/20, over the images in `glob` order (sorted here: glob's order is the file system's).
"""
from __future__ import annotations

import glob
import os

import numpy as np
from PIL import Image

from medjax.data.errors import DataError, DataFileNotFoundError
from medjax.data.readers.fundus_images import FundusImages

IMAGE_DIR, DISC_DIR, ATROPHY_DIR = "PALM-Training400", "Disc_Masks", os.path.join("Lesion_Masks", "Atrophy")
STRUCTURES = ("disc", "atrophy")  # output channels, in ContIG's order (torch.cat([disk, atrophy]))
SPLITS = ("train", "val", "test")
SPLIT_SEED = 42


def palm_split(ids: list[str], split: str, *, train_fraction: float = 0.6, val_fraction: float = 0.2,
               seed: int = SPLIT_SEED) -> np.ndarray:
    """Row indices of `split`: ContIG's two StratifiedShuffleSplits on class = (ID starts with "H")."""
    from sklearn.model_selection import StratifiedShuffleSplit

    if split not in SPLITS:
        raise DataError(f"PALM split {split!r}: expected one of {', '.join(SPLITS)}")
    classes = np.array([1 * (i[0] == "H") for i in ids])
    index = np.arange(len(ids))
    first = StratifiedShuffleSplit(n_splits=1, test_size=1 - train_fraction, random_state=seed)
    [(train, rest)] = first.split(index, classes)
    second = StratifiedShuffleSplit(n_splits=1, test_size=1 - val_fraction / (1 - train_fraction),
                                    random_state=seed + 1)
    [(val, test)] = second.split(index[rest], classes[rest])
    return {"train": train, "val": rest[val], "test": rest[test]}[split]


def read_mask(path: str, size: int, where: str) -> np.ndarray:
    """A PALM mask as float32 (size, size) foreground 0/1: 1 - (nearest-resized grey value) / 255."""
    try:
        with Image.open(path) as im:
            grey = im.convert("L").resize((size, size), resample=Image.Resampling.NEAREST)
            values = np.asarray(grey, np.float32)
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: {path} is not a readable mask image ({type(err).__name__}: {err})") from err
    return 1.0 - values / 255.0


class PALMDataset(FundusImages):
    """One split of PALM: items {"image": uint8 (size, size, 3), "mask": float32 (size, size, 2) = (disc,
    atrophy) foreground, "index"}. Images resized without a crop (ContIG's PALM loader), indices 0 .. len - 1 only
    (`medjax.data.readers.fundus_images`)."""

    circle_crop = False

    def __init__(self, root: str, split: str, *, image_size: int, train_fraction: float = 0.6,
                 val_fraction: float = 0.2):
        self.root, self.split, self.image_size = root, split, int(image_size)
        image_dir = os.path.join(root, IMAGE_DIR)
        if not os.path.isdir(image_dir):
            raise DataFileNotFoundError(f"{root}: no {IMAGE_DIR}/ folder of PALM images (<ID>.jpg)")
        paths = sorted(glob.glob(os.path.join(image_dir, "*.jpg")))
        if not paths:
            raise DataError(f"{image_dir}: no .jpg images; expected PALM's <ID>.jpg (e.g. H0001.jpg)")
        ids = [os.path.splitext(os.path.basename(p))[0] for p in paths]
        bad = [i for i in ids if i[:1] not in ("H", "N", "P")]
        if bad:
            raise DataError(f"{image_dir}: image names {bad[:3]} do not start with H, N or P (PALM's classes)")
        rows = palm_split(ids, split, train_fraction=train_fraction, val_fraction=val_fraction)
        self.ids = [ids[i] for i in rows]
        self.image_paths = [paths[i] for i in rows]
        self.image_wheres = [f"{root}: PALM image {i}" for i in self.ids]
        self.disc_paths = [os.path.join(root, DISC_DIR, f"{i}.bmp") for i in self.ids]
        missing = [p for p in self.disc_paths if not os.path.isfile(p)]
        if missing:
            raise DataFileNotFoundError(f"{missing[0]}: no optic disc mask ({len(missing)} of the {split} images "
                                        f"lack one); every PALM image has {DISC_DIR}/<ID>.bmp")
        atrophy = [os.path.join(root, ATROPHY_DIR, f"{i}.bmp") for i in self.ids]
        self.atrophy_paths = [p if os.path.isfile(p) else "" for p in atrophy]  # "": no atrophy (ContIG)

    def __getitem__(self, index: int) -> dict:
        index = self.check_index(index)
        size, where = self.image_size, self.image_wheres[index]
        disc = read_mask(self.disc_paths[index], size, where)
        atrophy = (read_mask(self.atrophy_paths[index], size, where) if self.atrophy_paths[index]
                   else np.zeros((size, size), np.float32))
        return {"image": self.load_image(index), "mask": np.stack([disc, atrophy], axis=-1), "index": index}
