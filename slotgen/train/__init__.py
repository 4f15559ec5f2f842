"""Training the miniature on the synthetic shape world (``slotgen train-miniature``)."""

from slotgen.train.miniature import TrainConfig, train_miniature

__all__ = ["TrainConfig", "train_miniature"]
