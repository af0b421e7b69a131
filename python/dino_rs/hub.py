"""Downloads into a per-user cache, for pretrained weights and datasets.

:func:`download` fetches a URL once into :func:`cache_dir` and returns the cached file from then on,
without a request. A download is streamed to a temporary file beside its destination and moved into
place only once it is complete and checked, so an interrupted, truncated or rejected download leaves
nothing in the cache, and two processes making the same first call both end with the whole file.

Environment variables:

``DINO_RS_HOME``
    The cache folder (default: the platform's user cache folder, e.g. ``~/.cache/dino_rs``).
``DINO_RS_OFFLINE=1``
    Never download: a file missing from the cache raises :class:`FileNotFoundError` saying where to
    place it.
``DINO_RS_DOWNLOAD_TIMEOUT``
    Seconds a connection may stay silent before the download fails (default 60).
"""

from __future__ import annotations

import errno
import http.client
import os
import sys
import secrets
import urllib.error
import urllib.request
from pathlib import Path, PurePath
from typing import IO, Any, Callable, Optional, Sequence, Union

from ._dino_rs import __version__
from ._errors import DownloadError

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_TIMEOUT = 60.0
_CHUNK = 1 << 16
_TRUE = ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """The folder :func:`download` caches into: ``$DINO_RS_HOME`` if set, else the platform's user
    cache folder (``platformdirs.user_cache_dir("dino_rs")`` when platformdirs is installed;
    otherwise ``$XDG_CACHE_HOME/dino_rs`` or ``~/.cache/dino_rs`` on Linux,
    ``~/Library/Caches/dino_rs`` on macOS, ``%LOCALAPPDATA%\\dino_rs\\Cache`` on Windows).
    The folder is not created here."""
    home = os.environ.get("DINO_RS_HOME")
    if home:
        return Path(home).expanduser()
    try:
        import platformdirs
    except ImportError:  # platformdirs is optional: its rules for the three usual platforms
        if sys.platform == "win32":
            local = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
            return Path(local) / "dino_rs" / "Cache"
        if sys.platform == "darwin":
            return Path.home() / "Library" / "Caches" / "dino_rs"
        xdg = os.environ.get("XDG_CACHE_HOME")
        # The XDG specification says to ignore a relative path.
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
        return base / "dino_rs"
    # appauthor=False: platformdirs would otherwise nest the name twice on Windows.
    return Path(platformdirs.user_cache_dir("dino_rs", appauthor=False))


# download()'s parameter of the same name hides the function there.
_default_cache_dir = cache_dir


def _offline() -> bool:
    """Whether ``DINO_RS_OFFLINE`` forbids downloads (``1``, ``true``, ``yes`` or ``on``)."""
    return os.environ.get("DINO_RS_OFFLINE", "").strip().lower() in _TRUE


def _timeout() -> float:
    value = os.environ.get("DINO_RS_DOWNLOAD_TIMEOUT")
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:  # also rejects nan
        raise ValueError(f"DINO_RS_DOWNLOAD_TIMEOUT must be a positive number of seconds, got {value!r}")
    return seconds


def _relative(filename: PathLike) -> PurePath:
    name = PurePath(os.fspath(filename))
    if not name.parts or name.is_absolute() or name.anchor or ".." in name.parts:
        raise ValueError(f"filename must be a relative path inside the cache (like 'weights/x.pth'), got {filename!r}")
    return name


def _bar(progress: Optional[bool], total: Optional[int], desc: str) -> Any:
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        if progress:
            raise ImportError("download(progress=True) needs tqdm (pip install tqdm)") from None
        return None  # tqdm is optional: download silently
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _fetch(url: str, out: IO[bytes], progress: Optional[bool], desc: str) -> int:
    """Streams ``url`` into ``out``; the number of bytes written. Raises :class:`DownloadError`
    unless the server answered 200 and sent as many bytes as its Content-Length announced."""
    request = urllib.request.Request(url, headers={"User-Agent": f"dino_rs/{__version__}"})
    try:
        response = urllib.request.urlopen(request, timeout=_timeout())
    except urllib.error.HTTPError as e:
        e.close()
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}", url, e.code) from None
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: {e.reason}", url) from e
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"{url}: {type(e).__name__}: {e}", url) from e
    with response:
        status = response.status
        if status != 200:  # e.g. 204 or 206: not the whole file
            raise DownloadError(f"{url}: HTTP {status} {response.reason} (expected 200)", url, status)
        announced = response.headers.get("Content-Length")
        total = int(announced) if announced and announced.strip().isdigit() else None
        bar = _bar(progress, total, desc)
        received = 0
        try:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    # A reset, a timeout or a chunked body cut short; disk errors come from write().
                    raise DownloadError(
                        f"{url}: connection lost after {received} bytes ({type(e).__name__}: {e})", url, status
                    ) from e
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    # http.client ends a body that stops short of its Content-Length as if it were complete.
    if total is not None and received != total:
        raise DownloadError(f"{url}: truncated download, {received} of {total} bytes received", url, status)
    return received


def download(
    url: str,
    filename: PathLike,
    *,
    cache_dir: Optional[PathLike] = None,
    progress: Optional[bool] = None,
    expected_size: Optional[int] = None,
    check: Optional[Callable[[Path], Any]] = None,
) -> Path:
    """The file ``filename`` of the cache, downloaded from ``url`` if it is not there yet.

    A cached file is returned without a request. Otherwise the file is streamed (urllib, with
    ``DINO_RS_DOWNLOAD_TIMEOUT``) to a temporary file in the same folder and moved into place only
    after every check passed; on any failure, Ctrl-C included, the temporary file is removed.

    Parameters
    ----------
    url : str
        Where the file comes from.
    filename : str or os.PathLike
        Its path relative to the cache folder; may have subfolders (``"weights/x.pth"``).
    cache_dir : str or os.PathLike, optional
        The cache folder (default :func:`cache_dir`).
    progress : bool, optional
        ``None``: a tqdm bar when tqdm is installed; ``True``: a tqdm bar (ImportError without tqdm);
        ``False``: silent.
    expected_size : int, optional
        The file's size in bytes; another size fails the download.
    check : callable, optional
        Called with the downloaded file's path before it enters the cache; raises if the file is
        not what was expected (e.g. not a checkpoint). Its exception is re-raised as ValueError.

    Returns
    -------
    pathlib.Path
        The cached file.

    Raises
    ------
    DownloadError
        (an OSError) HTTP error status, connection failure, truncated body or wrong size; names the URL.
    ValueError
        ``check`` rejected the file, or ``filename`` is not a relative path.
    FileNotFoundError
        ``DINO_RS_OFFLINE=1`` and the file is not cached: names the file, where to place it and the URL.
    """
    name = _relative(filename)
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    target = root / name
    if target.is_file():
        return target
    if _offline():
        raise FileNotFoundError(
            errno.ENOENT,
            f"{name.as_posix()} is not in the cache and DINO_RS_OFFLINE is set: download {url} and place it here",
            str(target),
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per download, so that concurrent downloads never write the same file; the
    # leading dot keeps it out of ordinary listings. os.open with mode 0o666 lets the umask decide
    # who may read the cached file, as for any file the user creates (NamedTemporaryFile's files
    # are private to their owner, which a cache shared by a group could not read).
    partial = target.parent / f".partial-{target.name}.{secrets.token_hex(8)}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            size = _fetch(url, out, progress, name.as_posix())
        if expected_size is not None and size != expected_size:
            raise DownloadError(f"{url}: {size} bytes received, expected {expected_size}", url)
        if check is not None:
            try:
                check(partial)
            except Exception as e:
                raise ValueError(f"{url}: the downloaded {name.as_posix()} was rejected: {e}") from e
        try:
            os.replace(partial, target)
        except PermissionError:
            # Windows refuses to replace a file another process holds open; that process's
            # download put the same file in place first.
            if not target.is_file():
                raise
            os.unlink(partial)
    except BaseException:
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
        raise
    return target


__all__: Sequence[str] = ["DownloadError", "cache_dir", "download"]
