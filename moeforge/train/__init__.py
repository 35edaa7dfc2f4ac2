"""Training: one loop (``loop.py``) shared by every stage; a stage = data + loss.

``pretrain.py`` is the pretraining stage and the ``moeforge pretrain`` command; SFT, reward
modelling, DPO and GRPO plug their own stage into :func:`moeforge.train.loop.train`.
Nothing is imported here on purpose: ``moeforge.config`` imports
``moeforge.train.post_config``, which runs this file, so it must not import the trainers
(they import ``moeforge.config``).
"""
