"""A built model folder in a cache: a recipe that records what went in, checksums of what came out, atomic replacement.

A folder is reused only when its `msd-recipe.json` equals the recipe of the requested build and every file listed in
its `SHA256SUMS` (the format `sha256sum -c` reads) still has that checksum. A build is written into a temporary
sibling folder and moved into place only when complete, so an interrupted build never leaves a half-written folder
under the final name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from msd.embedded.projector import file_sha256

logger = logging.getLogger(__name__)

RECIPE_FILE = "msd-recipe.json"
CHECKSUM_FILE = "SHA256SUMS"
CACHE_ENV = "MSD_CACHE_DIR"


def default_cache_root() -> Path:
    """`$MSD_CACHE_DIR`, else `$XDG_CACHE_HOME/msd`, else `~/.cache/msd`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "msd"


def is_current(folder: Path, recipe: dict) -> bool:
    """Check whether `folder` contains a complete build of `recipe` whose files match their recorded checksums."""
    recipe_path, checksum_path = folder / RECIPE_FILE, folder / CHECKSUM_FILE
    if not recipe_path.is_file() or not checksum_path.is_file():
        return False
    try:
        if json.loads(recipe_path.read_text()) != recipe:
            return False
    except json.JSONDecodeError:
        return False
    for line in checksum_path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            logger.warning("cached file %s is missing or changed; rebuilding", path)
            return False
    return True


def write_checksums(folder: Path) -> None:
    """Write `SHA256SUMS` with the SHA-256 of every other file in `folder`, the recipe file included."""
    names = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    lines = [f"{file_sha256(folder / name)}  {name}" for name in names if name != CHECKSUM_FILE]
    (folder / CHECKSUM_FILE).write_text("\n".join(lines) + "\n")


def build_cached(folder: Path, recipe: dict, write: Callable[[Path], None], force: bool = False) -> Path:
    """Return `folder` after making sure it contains a build of `recipe`, calling `write(temporary_folder)` if not.

    `write` fills an empty folder; the recipe and checksum files are added after it returns, and the folder then
    replaces `folder`. If `write` raises, the temporary folder is removed and `folder` is left as it was.
    """
    if not force and is_current(folder, recipe):
        logger.info("using the cached build in %s", folder)
        return folder

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp creates 0700; the finished folder is an ordinary readable cache
    try:
        write(staging)
        apply_umask(staging)
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
        write_checksums(staging)
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def apply_umask(folder: Path) -> None:
    """Give every file in `folder` the permissions a new file gets under the user's umask. safetensors 0.8 creates
    its files with mode 0600, which would make the cached weights unreadable to others sharing the cache."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def replace_folder(source: Path, destination: Path) -> None:
    """Move `source` to `destination`, replacing an existing folder there with two renames."""
    retired = None
    if destination.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old.", dir=destination.parent))
        os.replace(destination, retired / destination.name)
    os.replace(source, destination)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
