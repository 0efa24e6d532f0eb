"""Training: data readers, losses, the double-forward trainer and LLaVolta's staged schedule.

The public entry point is ``run_training(TrainConfig(...))`` (alias ``train``); ``f2b train`` calls it.
"""

from .data import DataFormatError, ImageLoader, Sample, read_dataset, split_samples
from .schedule import LLAVOLTA, PoolSchedule, ScheduleError, effective_stride, pooled_token_count, stage_at
from .trainer import TrainConfig, TrainEvent, Trainer, TrainingError, TrainResult, run_training, train

__all__ = [
    "DataFormatError", "ImageLoader", "LLAVOLTA", "PoolSchedule", "Sample", "ScheduleError", "TrainConfig",
    "TrainEvent", "TrainResult", "Trainer", "TrainingError", "effective_stride", "pooled_token_count",
    "read_dataset", "run_training", "split_samples", "stage_at", "train",
]
