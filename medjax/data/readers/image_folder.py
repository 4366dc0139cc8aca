"""Labelled images in torchvision's `ImageFolder` layout, `ROOT/<class>/**/<image>`, as the public pathology ROI
benchmarks ship: CRC-100K (Kather et al., PLoS Med. 2019) `NCT-CRC-HE-100K/<CLASS>/*.tif` (train) and
`CRC-VAL-HE-7K/<CLASS>/*.tif` (test), UNI's ROI evaluation sets.

    train = ImageFolderSource("NCT-CRC-HE-100K")
    test = ImageFolderSource("CRC-VAL-HE-7K", classes=train.classes)   # the same label numbers
    train[i] -> {"image": uint8 (H, W, 3), "label": int32}

Classes are the sub-directory names, sorted (torchvision's order), labels their index; files are every image
(`.tif .tiff .png .jpg .jpeg .bmp`) under a class directory, sorted by path. `classes=` fixes the label numbering
(a test set's class missing from it is an error naming the directory).
"""
from __future__ import annotations

import os

import numpy as np

from medjax.data.readers.image_io import read_image
from medjax.errors import MedjaxInputError

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


class ImageFolderSource:
    """Random access to (image, label) of an ImageFolder directory (module doc)."""

    def __init__(self, root: str, classes: list[str] | None = None):
        if not os.path.isdir(root):
            raise MedjaxInputError(f"{root}: image folder not found (expected ROOT/<class>/<image> files)")
        found = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))
        if not found:
            raise MedjaxInputError(f"{root}: no class sub-directories (expected ROOT/<class>/<image> files)")
        self.root = root
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise MedjaxInputError(f"{root}: class directories {unknown} are not among the classes {self.classes}")
        self.paths, labels = [], []
        for name in found:
            files = sorted(os.path.join(dirpath, f) for dirpath, _, names in os.walk(os.path.join(root, name))
                           for f in names if f.lower().endswith(IMAGE_EXTENSIONS))
            self.paths += files
            labels += [self.classes.index(name)] * len(files)
        if not self.paths:
            raise MedjaxInputError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class directories")
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"image": read_image(self.paths[index]), "label": np.int32(self.labels[index])}

    def describe(self, index: int) -> str:
        return f"{self.paths[index]} (class {self.classes[self.labels[index]]})"
