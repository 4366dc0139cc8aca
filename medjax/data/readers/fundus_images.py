"""What the fundus readers share (`FundusGenomeDataset`: UK Biobank / APTOS, `RFMiDDataset`, `PALMDataset`; MRM,
Yang et al., ICCV 2023, and its ContIG loaders): one image file per item, its path for error messages, the index
rule, and the image as the model sees it (RGB uint8, circle-cropped to the field of view as ContIG's
`crop_resize_all`, then resized; PALM's loader resizes without the crop).

Index rule, every fundus reader alike: items are 0 .. len - 1; any other index, negative ones included, is an
`IndexError` naming the dataset. (Grain's samplers and `medjax.tasks.common.Subset` only ever pass indices in that
range, so a negative one is a caller's bug that Python's wrap-around would hide by returning another image.)
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from medjax.data.readers.image_io import read_image
from medjax.data.transforms import image as image_transforms


class FundusImages:
    """Base of the fundus readers. A subclass's constructor sets `root`, `image_size` and `image_paths` (one per
    item, in item order); `circle_crop` says whether `load_image` crops to the field of view first."""

    circle_crop: ClassVar[bool] = True
    root: str
    image_size: int
    image_paths: list[str]

    def __len__(self) -> int:
        return len(self.image_paths)

    def check_index(self, index) -> int:
        """`index` as an int in 0 .. len - 1, else IndexError (the module's index rule)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.root}: index {index} out of range for a dataset of {len(self)} items "
                             f"(indices 0..{len(self) - 1}; negative indices are not accepted)")
        return index

    def describe(self, index) -> str:
        """Item `index`'s image file (for errors, `medjax.data.pipelines.bad_examples`)."""
        return self.image_paths[self.check_index(index)]

    def load_image(self, index) -> np.ndarray:
        """Item `index`'s image as uint8 (image_size, image_size, 3): RGB, circle-cropped (if `circle_crop`),
        resized bilinearly."""
        image = read_image(self.image_paths[self.check_index(index)])
        if self.circle_crop:
            image = image_transforms.circle_crop(image)
        return image_transforms.resize(image, self.image_size)
