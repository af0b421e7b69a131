"""Published DINO and DINOv2 backbones, downloaded once and loaded without PyTorch.

>>> import dino_rs as dr
>>> model = dr.from_pretrained("dinov2_vits14")       # doctest: +SKIP
>>> feats = model.embed(images, features="cls+avgpool")  # doctest: +SKIP

The weights come from the official public URLs (facebookresearch's DINO and DINOv2 releases) into
the cache of :mod:`dino_rs.hub` (``$DINO_RS_HOME``, else the user cache folder); a second call makes
no request, and ``DINO_RS_OFFLINE=1`` makes none at all.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from . import hub
from ._dino_rs import DINO, load_backbone

__all__ = ["PretrainedModel", "from_pretrained", "pretrained_models"]

_DINO = "https://dl.fbaipublicfiles.com/dino/"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2/"


@dataclass(frozen=True)
class PretrainedModel:
    """One published backbone: where it comes from and its architecture."""

    name: str
    url: str
    family: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    #: The size the position embedding was trained at (DINOv2: 518; features use 224 crops).
    img_size: int
    num_register_tokens: int = 0
    ffn: str = "mlp"

    @property
    def filename(self) -> str:
        return "checkpoints/" + self.url.rsplit("/", 1)[-1]


def _dino(name: str, file: str, dim: int, heads: int, patch: int) -> PretrainedModel:
    return PretrainedModel(name, f"{_DINO}{file}/{file}.pth", "dino", dim, 12, heads, patch, 224)


def _dinov2(size: str, dim: int, depth: int, heads: int, reg: bool) -> PretrainedModel:
    arch = f"dinov2_vit{size}14"
    suffix = "_reg4" if reg else ""
    return PretrainedModel(
        arch + ("_reg" if reg else ""),
        f"{_DINOV2}{arch}/{arch}{suffix}_pretrain.pth",
        "dinov2", dim, depth, heads, 14, 518,
        num_register_tokens=4 if reg else 0,
        ffn="swiglu" if size == "g" else "mlp",
    )


_MODELS: Dict[str, PretrainedModel] = {
    m.name: m
    for m in [
        _dino("dino_vits16", "dino_deitsmall16_pretrain", 384, 6, 16),
        _dino("dino_vits8", "dino_deitsmall8_pretrain", 384, 6, 8),
        _dino("dino_vitb16", "dino_vitbase16_pretrain", 768, 12, 16),
        _dino("dino_vitb8", "dino_vitbase8_pretrain", 768, 12, 8),
        *[
            _dinov2(size, dim, depth, heads, reg)
            for reg in (False, True)
            for size, dim, depth, heads in (("s", 384, 12, 6), ("b", 768, 12, 12), ("l", 1024, 24, 16),
                                            ("g", 1536, 40, 24))
        ],
    ]
}


def pretrained_models() -> List[Dict[str, Any]]:
    """Every backbone :func:`from_pretrained` knows: name, source URL, family and architecture."""
    return [asdict(m) for m in _MODELS.values()]


def _is_torch_checkpoint(path: Path) -> None:
    """Refuses a download that is not a PyTorch checkpoint (an HTML error page, a wrong URL)
    before it enters the cache; the full check is loading it."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a PyTorch checkpoint (not a zip archive)")
    with zipfile.ZipFile(path) as z:
        if not any(n.endswith("data.pkl") for n in z.namelist()):
            raise ValueError(f"{path}: a zip archive without data.pkl, not a PyTorch checkpoint")


def from_pretrained(
    name: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    url: Optional[str] = None,
    progress: Optional[bool] = None,
) -> DINO:
    """A published DINO or DINOv2 backbone, ready for :meth:`DINO.embed` and :meth:`DINO.attention`.

    Parameters
    ----------
    name : str
        One of :func:`pretrained_models`: ``dino_vits16``, ``dino_vits8``, ``dino_vitb16``,
        ``dino_vitb8``, ``dinov2_vits14``, ``dinov2_vitb14``, ``dinov2_vitl14``, ``dinov2_vitg14``
        and the DINOv2 ``_reg`` variants (four register tokens).
    device, dtype : str
        As for :func:`load_backbone`.
    cache_dir : path, optional
        Where the file is kept (default :func:`dino_rs.hub.cache_dir`).
    url : str, optional
        Another source for the same file (a mirror); cached under the URL's file name.
    progress : bool, optional
        A tqdm bar while downloading (default: when tqdm is installed).

    Raises
    ------
    ValueError
        An unknown name, a file that is not a checkpoint, or one whose architecture is not the name's.
    dino_rs.hub.DownloadError
        The download failed (HTTP error, connection lost, truncated file); nothing is cached.
    FileNotFoundError
        ``DINO_RS_OFFLINE=1`` and the file is not cached: says where to place it.
    """
    model = _MODELS.get(name)
    if model is None:
        raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(_MODELS)}")
    source = url or model.url
    filename = "checkpoints/" + source.rsplit("/", 1)[-1] if url else model.filename
    path = hub.download(source, filename, cache_dir=cache_dir, progress=progress, check=_is_torch_checkpoint)
    backbone = load_backbone(path, num_heads=model.num_heads, device=device, dtype=dtype)
    got = (backbone.family, backbone.embed_dim, backbone.depth, backbone.patch_size, backbone.num_register_tokens)
    want = (model.family, model.embed_dim, model.depth, model.patch_size, model.num_register_tokens)
    if got != want:
        raise ValueError(
            f"{path}: holds a {got[0]} ViT (embed_dim {got[1]}, depth {got[2]}, patch {got[3]}, "
            f"{got[4]} registers), not {name}'s (embed_dim {want[1]}, depth {want[2]}, patch {want[3]}, "
            f"{want[4]} registers); delete the file to download it again"
        )
    return backbone
