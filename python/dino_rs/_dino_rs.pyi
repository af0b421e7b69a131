"""Type stubs for the Rust extension module ``dino_rs._dino_rs``."""

import os
from typing import Any, Iterator, Literal, Optional, Sequence, Tuple, Union, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "__version__",
    "DEFAULT_MAX_PIXELS",
    "MultiCropAugmenter",
    "ImageFolder",
    "ArrayDataset",
    "MultiCropLoader",
    "_LoaderIterator",
    "DINO",
    "DINOLoss",
    "_Trainer",
    "load_backbone",
    "cosine_scheduler",
    "set_num_threads",
    "get_num_threads",
    "cuda_is_available",
    "cuda_error",
    "build_info",
    "_write_png",
    "_kernel_parity",
    "_train_config",
]

__version__: str
DEFAULT_MAX_PIXELS: int

_Path = Union[str, "os.PathLike[str]"]
_Image = Union[_Path, npt.ArrayLike]
_Batch = Union[npt.NDArray[np.uint8], Sequence[_Image]]
_F32 = npt.NDArray[np.float32]
_Features = Literal["cls", "patch", "cls+avgpool"]

def set_num_threads(n: int) -> None:
    """Sets the number of threads dino_rs computes on (default: DINO_RS_NUM_THREADS, else all cores)."""

def get_num_threads() -> int:
    """The number of threads dino_rs computes on."""

def cuda_is_available() -> bool:
    """Whether this build has CUDA support and a CUDA device can be opened."""

def build_info() -> dict[str, Any]:
    """Which build is installed ("cpu" or "cuda"), the CUDA version and compute capability a
    CUDA build targets, and the CPU features detected at run time."""
def cuda_error() -> Optional[str]:
    """Why no CUDA device can be used, or None when one opens: a CPU-only build, no driver library,
    no device, a driver too old for the build, ... (what ``cuda_is_available()`` answers False for)."""

def _write_png(path: _Path, image: npt.NDArray[np.uint8]) -> None: ...
def _kernel_parity(device: str) -> list[tuple[str, Optional[float], Optional[str]]]: ...
def _train_config(overrides: dict[str, Any]) -> dict[str, Any]: ...

@final
class MultiCropAugmenter:
    """DINO's multi-crop augmentation (DataAugmentationDINO), every knob a parameter, official defaults.

    Two global views (``global_size``, scale ``global_scale``) and ``n_local`` local views
    (``local_size``, scale ``local_scale``), each RandomResizedCrop (bicubic) + flip + colour jitter
    + grayscale + Gaussian blur (probabilities ``blur_p`` for global 1, global 2, locals) +
    solarize (global 2 only) + normalisation with ``mean``/``std``.

    Defaults of the tuple arguments (shown as ``...`` in the signature): ``global_scale=(0.4, 1.0)``,
    ``local_scale=(0.05, 0.4)``, ``blur_p=(1.0, 0.1, 0.5)``, ``blur_sigma=(0.1, 2.0)``,
    ``mean=(0.485, 0.456, 0.406)``, ``std=(0.229, 0.224, 0.225)`` (ImageNet's), ``ratio=(3/4, 4/3)``;
    ``max_pixels=DEFAULT_MAX_PIXELS``.
    """

    def __new__(
        cls,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: Tuple[float, float] = ...,
        local_scale: Tuple[float, float] = ...,
        flip_p: float = 0.5,
        color_jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: Tuple[float, float, float] = ...,
        blur_sigma: Tuple[float, float] = ...,
        solarize_p: float = 0.2,
        mean: Sequence[float] = ...,
        std: Sequence[float] = ...,
        ratio: Tuple[float, float] = ...,
        max_pixels: int = ...,
    ) -> "MultiCropAugmenter": ...
    def __getnewargs_ex__(self) -> Tuple[Tuple[()], dict[str, Any]]:
        """Pickling support: the constructor arguments."""
    def __call__(self, image: _Image, seed: Optional[int] = None) -> list[_F32]:
        """The 2 + n_local views of one image, globals first, each float32 (3, S, S)."""
    def batch(self, images: _Batch, seed: Optional[int] = None) -> Tuple[_F32, _F32]:
        """(globals (2, B, 3, G, G), locals (n_local, B, 3, L, L)) float32; decoded and augmented in parallel."""
    def get_params(self) -> dict[str, Any]:
        """The constructor arguments of this augmenter."""
    @property
    def global_size(self) -> int: ...
    @property
    def local_size(self) -> int: ...
    @property
    def n_local(self) -> int: ...
    @property
    def n_views(self) -> int: ...

@final
class ImageFolder:
    """Every image under ``root`` (recursive); classes are the sorted first-level subfolders,
    images directly under ``root`` get label -1."""

    def __new__(cls, root: _Path, max_pixels: int = ...) -> "ImageFolder": ...
    @property
    def root(self) -> str: ...
    @property
    def paths(self) -> list[str]: ...
    @property
    def labels(self) -> npt.NDArray[np.int64]: ...
    @property
    def classes(self) -> list[str]: ...
    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> Tuple[npt.NDArray[np.uint8], int]: ...

@final
class ArrayDataset:
    """Images in memory: uint8 (N, H, W) or (N, H, W, 3), optional integer labels."""

    def __new__(cls, images: npt.NDArray[np.uint8], labels: Optional[Sequence[int]] = None) -> "ArrayDataset": ...
    @property
    def labels(self) -> Optional[npt.NDArray[np.int64]]: ...
    @property
    def shape(self) -> Tuple[int, int, int, int]: ...
    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> Tuple[npt.NDArray[np.uint8], int]: ...

@final
class _LoaderIterator(Iterator[Tuple[_F32, _F32]]):
    def __iter__(self) -> "_LoaderIterator": ...
    def __next__(self) -> Tuple[_F32, _F32]: ...
    def close(self) -> None:
        """Stops the background work now."""

@final
class MultiCropLoader:
    """Shuffled batches of multi-crop views, decoded and augmented on native threads, ``prefetch``
    batches ahead. Each ``iter()`` is a new epoch. ``on_error="skip"`` skips unreadable files
    (with one warning per epoch); ``"raise"`` raises ``dino_rs.ImageError``."""

    def __new__(
        cls,
        dataset: Union[ImageFolder, ArrayDataset, npt.NDArray[np.uint8]],
        augmenter: MultiCropAugmenter,
        batch_size: int = 64,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        prefetch: int = 4,
        on_error: str = "raise",
    ) -> "MultiCropLoader": ...
    def __len__(self) -> int: ...
    def __iter__(self) -> _LoaderIterator: ...
    @property
    def epoch(self) -> int: ...
    @epoch.setter
    def epoch(self, value: int) -> None: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def dataset(self) -> Union[ImageFolder, ArrayDataset, npt.NDArray[np.uint8]]: ...
    @property
    def augmenter(self) -> MultiCropAugmenter: ...

@final
class DINO:
    """A DINO model: a ViT student and its EMA teacher, each with a DINO head."""

    def __new__(
        cls,
        arch: str = "vit_small",
        patch_size: int = 16,
        img_size: int = 224,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        drop_path_rate: float = 0.1,
        device: str = "auto",
        seed: int = 0,
        embed_dim: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        nlayers: int = 3,
        dtype: Literal["float32", "bfloat16"] = "float32",
        init: Literal["dino", "torch"] = "dino",
    ) -> "DINO":
        """``init``: how the linear layers start: "dino" (the official N(0, 0.02) weights, zero
        biases) or "torch" (PyTorch's nn.Linear default, U(+-1/sqrt(fan_in)), which learns on
        small data)."""
    def forward_backbone(
        self,
        crops: npt.NDArray[np.float32],
        teacher: bool = True,
        batch_size: int = 256,
        features: _Features = "cls",
    ) -> _F32:
        """Features of normalised crops (N, 3, H, W): "cls" (N, embed_dim), "patch"
        (N, patches, embed_dim) or "cls+avgpool" (N, 2 * embed_dim)."""
    def attention(self, crops: npt.NDArray[np.float32], teacher: bool = True) -> _F32:
        """Last-block CLS->patch attention (N, heads, H/p, W/p)."""
    def embed(
        self,
        images: Union[_Batch, ImageFolder, ArrayDataset],
        batch_size: int = 128,
        progress: Optional[bool] = None,
        features: _Features = "cls",
    ) -> _F32:
        """Teacher features with the family's eval transform (resize to 256/224 of the crop,
        centre crop: DINO's training size, DINOv2's 224): "cls" (N, embed_dim), "patch"
        (N, patches, embed_dim) or "cls+avgpool" (N, 2 * embed_dim, DINOv2's linear evaluation
        input); a tqdm bar with ``progress=True`` (default: for more than four batches, when tqdm
        is installed)."""
    def save(self, path: _Path) -> None: ...
    @staticmethod
    def load(path: _Path, device: str = "auto", dtype: Literal["float32", "bfloat16"] = "float32") -> "DINO": ...
    def export_backbone(self, path: _Path, layout: Literal["official", "timm", "hf"] = "official") -> None:
        """The teacher backbone as safetensors in a published key layout; "hf" writes a folder
        with model.safetensors and config.json."""
    @property
    def family(self) -> Literal["dino", "dinov2"]: ...
    @property
    def num_register_tokens(self) -> int: ...
    @property
    def embed_dim(self) -> int: ...
    @property
    def depth(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def patch_size(self) -> int: ...
    @property
    def img_size(self) -> int: ...
    @property
    def out_dim(self) -> Optional[int]: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str:
        """The compute dtype of inference ("float32" or "bfloat16"); the weights are float32."""
    @property
    def config(self) -> dict[str, Any]: ...

def load_backbone(
    path: _Path,
    num_heads: Optional[int] = None,
    device: str = "auto",
    dtype: Literal["float32", "bfloat16"] = "float32",
) -> DINO:
    """A DINO or DINOv2 backbone from published weights, read without torch: official .pth
    (bare or a training checkpoint), timm or transformers files (or a transformers folder), or
    export_backbone's safetensors."""

@final
class DINOLoss:
    """The official DINOLoss with centring, on NumPy arrays; ``sinkhorn_iterations`` > 0 takes
    DINOv2's Sinkhorn-Knopp targets instead (the centre then stays zero)."""

    def __new__(
        cls,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        nepochs: int = 100,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 0,
    ) -> "DINOLoss": ...
    def __call__(self, student_out: npt.NDArray[np.float32], teacher_out: npt.NDArray[np.float32], epoch: int) -> float: ...
    @property
    def center(self) -> _F32: ...
    def teacher_temp(self, epoch: int) -> float: ...

def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> npt.NDArray[np.float64]:
    """The official utils.cosine_scheduler: one value per iteration."""

@final
class _Trainer:
    def __new__(
        cls,
        model: DINO,
        config: dict[str, Any],
        batch_size: int,
        niter_per_ep: int,
        n_local: int,
        dtype: Optional[Literal["float32", "bfloat16"]] = None,
    ) -> "_Trainer": ...
    def step(self, globals: npt.NDArray[np.float32], locals: Optional[npt.NDArray[np.float32]] = None) -> dict[str, float]: ...
    def train_epoch(self, loader: MultiCropLoader, epoch: int, callback: Optional[Any] = None) -> dict[str, float]: ...
    def save(self, path: _Path, extra: str = "{}") -> None: ...
    @staticmethod
    def load(
        path: _Path, device: str = "auto", dtype: Optional[Literal["float32", "bfloat16"]] = None
    ) -> Tuple["_Trainer", DINO, str]: ...
    @property
    def iteration(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def profile(self) -> bool: ...
    @profile.setter
    def profile(self, on: bool) -> None: ...
    @property
    def niter_per_ep(self) -> int: ...
    @property
    def model(self) -> DINO: ...
    @property
    def config(self) -> dict[str, Any]: ...
