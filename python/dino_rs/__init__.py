"""dino_rs: DINO self-supervised learning (self-distillation with no labels) in Rust, from Python.

Multi-crop augmentation, datasets and a native loader run on Rust threads with the GIL released;
arrays are NumPy. See ``help(dino_rs.MultiCropAugmenter)`` to start.
"""

from ._dino_rs import (
    DEFAULT_MAX_PIXELS,
    DINO,
    ArrayDataset,
    DINOLoss,
    ImageFolder,
    MultiCropAugmenter,
    MultiCropLoader,
    __version__,
    cosine_scheduler,
    cuda_is_available,
    get_num_threads,
    load_backbone,
    set_num_threads,
)
from ._errors import ImageError
from .datasets import fashion_mnist
from .demo import bundled_photos, multicrop_grid
from .evaluation import knn_accuracy
from .trainer import Trainer

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DINO",
    "DINOLoss",
    "Trainer",
    "ArrayDataset",
    "ImageError",
    "ImageFolder",
    "MultiCropAugmenter",
    "MultiCropLoader",
    "__version__",
    "bundled_photos",
    "cosine_scheduler",
    "cuda_is_available",
    "fashion_mnist",
    "get_num_threads",
    "knn_accuracy",
    "load_backbone",
    "multicrop_grid",
    "set_num_threads",
]
