"""Training: the trainer, its schedule and its checkpoints."""

from bmojo.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from bmojo.training.schedule import lr_at
from bmojo.training.trainer import (
    IGNORE_INDEX,
    Batch,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    TrainResult,
    loss_and_accuracy,
)

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "find_checkpoint",
    "load_checkpoint",
    "loss_and_accuracy",
    "lr_at",
    "save_checkpoint",
]
