"""Exception types of dino_rs, defined in Python so that they print well and users can catch them
(the Rust extension raises :class:`ImageError`; :mod:`dino_rs.hub` raises :class:`DownloadError`)."""

from __future__ import annotations

from typing import Optional


class ImageError(OSError):
    """A file could not be read as an image: corrupt, truncated, empty, unsupported, or above
    ``max_pixels``. ``filename`` names the file and ``strerror`` says what is wrong with it."""

    def __str__(self) -> str:
        if self.filename is None:
            return super().__str__()
        return f"{self.filename}: {self.strerror}"


class DownloadError(ConnectionError):
    """A download did not deliver the whole file: an HTTP error status, a connection refused, reset
    or timed out, or fewer bytes than announced. ``url`` names what was fetched and ``status`` is the
    HTTP status when the server sent one (else ``None``). Nothing is left in the cache."""

    # url and status have defaults so that pickling (multiprocessing) can rebuild the exception
    # from its message alone and then restore them from its __dict__.
    def __init__(self, message: str, url: str = "", status: Optional[int] = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
