"""Exception types raised by the Rust extension (defined in Python so they print well)."""

from __future__ import annotations


class ImageError(OSError):
    """A file could not be read as an image: corrupt, truncated, empty, unsupported, or above
    ``max_pixels``. ``filename`` names the file and ``strerror`` says what is wrong with it."""

    def __str__(self) -> str:
        if self.filename is None:
            return super().__str__()
        return f"{self.filename}: {self.strerror}"
