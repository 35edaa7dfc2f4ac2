"""Data settings (the ``[data]`` section of a recipe): where shards and the tokenizer live.

The data pipeline (``moeforge prepare``) writes token shards plus a manifest into
``data_dir``; trainers read them through ``moeforge.data.loader``.
"""

from __future__ import annotations

from dataclasses import dataclass


from moeforge.errors import ConfigError


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class DataConfig:
    data_dir: str = "data_cache/tiny"  # token shards + manifest.json
    tokenizer: str = ""  # path to tokenizer.json; empty = <data_dir>/tokenizer.json
    val_fraction: float = 0.02

    def validate(self) -> None:
        _require(bool(self.data_dir), "data.data_dir must not be empty")
        _require(0.0 <= self.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
