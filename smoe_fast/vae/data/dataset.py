"""The container every image source returns (see the field table in :mod:`smoe_fast.vae.data`)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class ImageDataset(NamedTuple):
    """Images with their labels; see the module docstring for the field table.

    ``len(dataset)`` is the number of fields (a NamedTuple); use :attr:`num_images`.
    """
    images: torch.Tensor
    labels: torch.Tensor
    substyles: torch.Tensor | None
    class_names: tuple[str, ...]
    substyle_names: tuple[str, ...] | None = None

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _as_dataset(images_u8: np.ndarray, labels: np.ndarray, substyles, class_names, substyle_names=None) -> ImageDataset:
    images = torch.from_numpy(images_u8).to(torch.float32).div_(255.0).unsqueeze(1)
    # torch.tensor copies: the in-process synthetic cache must never share memory with a caller.
    return ImageDataset(images=images, labels=torch.tensor(labels, dtype=torch.int64),
                        substyles=None if substyles is None else torch.tensor(substyles, dtype=torch.int64),
                        class_names=tuple(class_names), substyle_names=substyle_names)
