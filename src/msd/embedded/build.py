"""Building the default target, a LLaVA model of SmolLM2-135M-Instruct and DINOv2-S/14, into a cached folder.

Default image size: 112 px, which gives (112 / 14)^2 = 64 visual tokens per image. Prefill cost on a CPU grows with
the number of tokens, and the 224 px encoder resolution gives 256 tokens, four times the prefill and projector
training cost. Stock `LlavaForConditionalGeneration` has no token pooling, so fewer tokens at a higher resolution would
need custom modeling code that `AutoModelForImageTextToText` could not load. DINOv2 interpolates its position
embeddings to any multiple of 14 px, so `image_size` is an option, but the projector is trained at one size and
works best at it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import transformers

from msd.embedded.assemble import assemble_llava
from msd.embedded.cache import build_cached, default_cache_root
from msd.embedded.language import load_language_model
from msd.embedded.projector import PACKAGED_PROJECTOR, file_sha256, read_projector
from msd.embedded.sources import LANGUAGE_PACKAGE, VISION_PACKAGE, WeightPackage, installed_version, locate
from msd.embedded.vision import load_vision_model
from msd.errors import MSDError

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 112
DEFAULT_FOLDER_NAME = "default-target"
BUILD_FORMAT = 1  # bump when the assembly changes what a build writes
PROJECTOR_INIT_SEED = 0


def default_target_folder() -> Path:
    """Return the default target's cache folder (`default_cache_root` lists the environment variables)."""
    return default_cache_root() / DEFAULT_FOLDER_NAME


def build_default_target(
    folder: Path | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    projector: Path | None = None,
    force: bool = False,
    untrained_projector: bool = False,
) -> Path:
    """Build the default target into `folder` with `save_pretrained` unless a matching build is cached there.

    `projector` is a projector file from `msd embedded train-projector`; it defaults to the one kept in the msd
    source tree when that exists, and otherwise the projector stays randomly initialised (seed 0) and answers ignore
    the image content. `untrained_projector` keeps that random initialisation even when a trained file exists: it is
    the starting point of projector training. Returns the folder. Raises MSDError when a weight package or its reader
    is missing.
    """
    if untrained_projector and projector is not None:
        raise MSDError("pass either a projector file or the untrained projector option, not both.")
    folder = Path(folder) if folder is not None else default_target_folder()
    language_file, vision_file = locate(LANGUAGE_PACKAGE), locate(VISION_PACKAGE)
    if projector is None and not untrained_projector and PACKAGED_PROJECTOR.is_file():
        projector = PACKAGED_PROJECTOR
    recipe = {
        "format": BUILD_FORMAT,
        "language_model": package_entry(LANGUAGE_PACKAGE, language_file),
        "vision_model": package_entry(VISION_PACKAGE, vision_file),
        "image_size": image_size,
        "projector": {"sha256": file_sha256(projector)} if projector else {"init_seed": PROJECTOR_INIT_SEED},
        "transformers": transformers.__version__,
    }

    def write(staging: Path) -> None:
        projector_state = None
        if projector is not None:
            projector_state, metadata = read_projector(projector)
            trained_size = metadata.get("image_size")
            if trained_size and int(trained_size) != image_size:
                logger.warning(
                    "the projector in %s was trained at %s px but the target is built for %d px images",
                    projector,
                    trained_size,
                    image_size,
                )
        else:
            logger.warning("no trained projector found; the default target's projector is untrained")
        language_model, tokenizer = load_language_model(language_file)
        vision_model = load_vision_model(vision_file)
        model, processor = assemble_llava(
            language_model, tokenizer, vision_model, image_size, projector_state, seed=PROJECTOR_INIT_SEED
        )
        logger.info("writing the default target to %s", folder)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)

    return build_cached(folder, recipe, write, force=force)


def package_entry(package: WeightPackage, path: Path) -> dict:
    return {
        "package": package.distribution,
        "version": installed_version(package),
        "file": package.file,
        "bytes": path.stat().st_size,
    }
