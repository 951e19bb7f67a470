"""Training: one loop (`Trainer`) for every objective, with checkpoints, logging and torchrun.

    from llmkit.train import Trainer, TrainConfig
    from llmkit.objectives import clm_loss
    result = Trainer(model, clm_loss, train_batches, val_data=val_batches,
                     config=TrainConfig(out_dir="runs/x", max_steps=200, lr=1e-3)).fit()
"""
from .checkpoint import find_latest, load_checkpoint, load_model_tensors, save_checkpoint
from .config import TrainConfig
from .distributed import rank_and_world_size
from .optim import build_optimizer, build_scheduler, lr_at, parameter_groups
from .trainer import CALLBACK_HOOKS, Trainer, TrainingDiverged, TrainResult, seed_everything

__all__ = ["Trainer", "TrainConfig", "TrainResult", "TrainingDiverged", "CALLBACK_HOOKS", "save_checkpoint",
           "load_checkpoint", "load_model_tensors", "find_latest", "build_optimizer", "build_scheduler", "lr_at",
           "parameter_groups", "rank_and_world_size", "seed_everything"]
