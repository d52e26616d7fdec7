"""Image loading with errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from msd.errors import MSDError


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully and convert it to RGB.

    Raises MSDError for a missing file, a file Pillow cannot identify, and a truncated or corrupt file.
    """
    path = Path(path)
    if not path.exists():
        raise MSDError(f"image file not found: {path}. Check the path passed with --image.")
    if not path.is_file():
        raise MSDError(f"image path is not a file: {path}.")
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel, so truncated data fails here and not inside the processor
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise MSDError(
            f"unsupported or unreadable image format: {path}. Use a format Pillow reads (PNG, JPEG, WebP, BMP, ...)."
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise MSDError(f"corrupt image file {path}: {error}. Re-export or re-download the image.") from None
