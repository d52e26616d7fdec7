"""Image loading with errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from msd.errors import MSDError


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully and convert it to RGB.

    Raises MSDError for a missing file, a file Pillow cannot identify, and a truncated or corrupt file.
    """
    path = Path(path)
    if not path.exists():
        raise MSDError(
            f"image file not found: {path}. Check the path: a relative path starts from the current directory, or "
            "from the image folder option of commands that have one."
        )
    if not path.is_file():
        raise MSDError(
            f"image path is not a file: {path}. Pass one image file (JPEG, PNG or another format Pillow reads)."
        )
    # Some libraries (lmms-eval among them) set Pillow's process-wide LOAD_TRUNCATED_IMAGES on import, which would
    # turn a truncated file into a silently padded picture. Decode strictly here and restore the setting after.
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel, so truncated data fails here and not inside the processor
            if image.mode.startswith("I;16"):
                # Pillow (13.0) clips 16-bit samples to 255 when converting to RGB, which turns most pictures white.
                # Its `point` takes no big-endian I;16B (16-bit TIFF, PGM), so the samples go through mode I first.
                # NOTE: Pillow opens some 16-bit files (PGM among them) as mode I, and those are still clipped.
                image = image.convert("I").point(lambda value: value / 257).convert("L")
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise MSDError(
            f"unsupported or unreadable image format: {path}. Use a format Pillow reads (PNG, JPEG, WebP, BMP, ...)."
        ) from None
    except DecompressionBombError as error:
        raise MSDError(f"image too large: {path}: {error} Downscale the image first.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise MSDError(f"corrupt image file {path}: {error}. Re-export or re-download the image.") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
