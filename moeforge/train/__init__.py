"""Training: one loop (``loop.py``) shared by every stage; a stage = data + loss.

``pretrain.py`` is the pretraining stage and the ``moeforge pretrain`` command; SFT, reward
modelling, DPO and GRPO plug their own stage into :func:`moeforge.train.loop.train`.
"""

from moeforge.train.loop import Stage, TrainingStopped, TrainResult, train
from moeforge.train.optim import AdamW, lr_at, micro_batches_at

__all__ = ["AdamW", "Stage", "TrainResult", "TrainingStopped", "lr_at", "micro_batches_at", "train"]
