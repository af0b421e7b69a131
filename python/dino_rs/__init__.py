"""dino_rs: DINO self-supervised learning (self-distillation with no labels) in Rust, from Python.

Multi-crop augmentation, datasets and a native loader run on Rust threads with the GIL released;
arrays are NumPy. See ``help(dino_rs.MultiCropAugmenter)`` to start.

Notebook helpers (optional dependencies, imported only when used; ``pip install "dino-rs[notebook]"``):
``plot_history`` / ``plot_attention`` (matplotlib), ``linear_probe`` and ``dino_rs.sklearn.DINOEmbedder``
(scikit-learn), the Trainer's progress bar (tqdm). Command line: ``dino-rs train | embed | demo``.
"""

import os as _os

# The extension's allocator (mimalloc) reads its options when the extension loads. Its default
# returns freed memory to the OS after 1 s, so every training step faulted its tensor buffers in
# again (47k -> 13k page faults for 6 steps of a small ViT). Keep freed memory for reuse unless
# the user chose otherwise.
_os.environ.setdefault("MIMALLOC_PURGE_DELAY", "-1")
# candle keeps a second worker pool, for its own element-wise ops on large tensors, in a static
# that a fork()ed child inherits without its threads: training in a multiprocessing worker (fork
# start method) then waited on them forever once the parent had trained. dino_rs's heavy work runs
# on its own pool, which is rebuilt after a fork; candle's pool is only kept for users who ask.
_os.environ.setdefault("CANDLE_NUM_THREADS", "1")
# With more than one candle thread, its workers spin 25,000 times after each operation before
# parking; on a machine whose cores are all busy with the step itself, that spinning took ~15% of a
# training step (small32, 2 threads: 3.3 -> 2.6-2.9 s with a limit of 100).
_os.environ.setdefault("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100")
# candle sizes each CPU matmul's split by RAYON_NUM_THREADS, and without it counts the physical
# cores on Linux by reading /proc/cpuinfo, anew for every matmul: 18 of the 46 ms of a small
# bfloat16 training step on 2 cores, and a file that grows with the cores. Set to rayon's own
# default (the CPUs this process may run on), which other rayon pools in the process would take
# anyway; the matmuls run on dino_rs's pool whatever the split.
if hasattr(_os, "sched_getaffinity"):
    _os.environ.setdefault("RAYON_NUM_THREADS", str(len(_os.sched_getaffinity(0)) or 1))

from ._dino_rs import (  # noqa: E402
    DEFAULT_MAX_PIXELS,
    DINO,
    ArrayDataset,
    DINOLoss,
    ImageFolder,
    MultiCropAugmenter,
    MultiCropLoader,
    __version__,
    build_info,
    cosine_scheduler,
    cuda_error,
    cuda_is_available,
    get_num_threads,
    load_backbone,
    set_num_threads,
)
from ._errors import ImageError
from ._distribution import warn_if_both as _warn_if_both
from .config import TrainConfig
from . import hub, recipes
from .datasets import fashion_mnist
from .demo import bundled_photos, multicrop_grid
from .evaluation import knn_accuracy, linear_probe
from .plot import plot_attention, plot_history
from .pretrained import from_pretrained, pretrained_models
from .trainer import Trainer

_warn_if_both(build_info()["build"])

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DINO",
    "DINOLoss",
    "TrainConfig",
    "Trainer",
    "ArrayDataset",
    "ImageError",
    "ImageFolder",
    "MultiCropAugmenter",
    "MultiCropLoader",
    "__version__",
    "build_info",
    "bundled_photos",
    "cosine_scheduler",
    "cuda_error",
    "cuda_is_available",
    "fashion_mnist",
    "from_pretrained",
    "get_num_threads",
    "knn_accuracy",
    "linear_probe",
    "load_backbone",
    "multicrop_grid",
    "plot_attention",
    "plot_history",
    "pretrained_models",
    "set_num_threads",
]
