"""Draft training on stored target features: objective, two-stage curriculum and the accelerate loop."""

from msd.train.config import TrainConfig, load_train_config
from msd.train.curriculum import Curriculum, CurriculumConfig, CurriculumPosition
from msd.train.loss import LossConfig, build_slots, compute_loss
from msd.train.trainer import DraftTrainer, make_accelerator

__all__ = [
    "Curriculum",
    "CurriculumConfig",
    "CurriculumPosition",
    "DraftTrainer",
    "LossConfig",
    "TrainConfig",
    "build_slots",
    "compute_loss",
    "load_train_config",
    "make_accelerator",
]
