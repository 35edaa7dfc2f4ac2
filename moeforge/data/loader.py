"""Reading token shards for training: a map-style dataset and a deterministic, resumable loader.

Choices:
- :class:`TokenDataset` memory-maps each shard of a split (nothing is copied into RAM) and
  serves windows of ``seq_len + 1`` tokens (inputs plus the shifted targets) at stride
  ``seq_len``, so consecutive windows share one boundary token and every token is a target
  exactly once. Windows never cross shards; each shard's tail shorter than a window is unused.
- Opening a split checks every shard's size and (by default) SHA-256 against the manifest,
  and that no token id is outside the vocabulary: a corrupt shard fails at start-up with the
  file's name, not as a silent NaN hours later.
- :class:`TokenLoader` shuffles windows with a permutation seeded by ``(seed, epoch)``. At
  each step the ``world_size`` data-parallel ranks take consecutive, disjoint slices of that
  permutation, so they never see the same window in an epoch and together they consume the
  same global batches as one process with ``batch_size * world_size`` would. The state is
  three integers (epoch, samples consumed in the epoch, seed): exact resume, and resuming
  with a different data-parallel size continues from the same sample position.
- Document masking is optional and computed from the tokens: :func:`document_ids` numbers
  the packed documents (a new one starts after each <|eos|>) and :func:`document_mask`
  turns that into a causal mask that does not cross documents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moeforge.data.shards import read_manifest, verify_shard, verify_tokenizer
from moeforge.data.tokenizer import MoeTokenizer, load_tokenizer  # noqa: F401  (re-exported for trainers)
from moeforge.errors import UserError


class TokenDataset:
    def __init__(self, data_dir: str | Path, split: str = "train", seq_len: int = 128, verify: bool = True,
                 tokenizer: str | Path | None = None):
        self.data_dir = Path(data_dir)
        self.manifest: dict = read_manifest(self.data_dir)
        self.vocab_size: int = int(self.manifest["vocab_size"])
        self.dtype = self.manifest["dtype"]
        self.seq_len, self.split = int(seq_len), split
        if self.seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        splits = self.manifest["splits"]
        if split not in splits:
            raise UserError(f"{self.data_dir / 'manifest.json'}: no split {split!r} (has {', '.join(splits)})")
        self.tokenizer_path = verify_tokenizer(self.data_dir, self.manifest, tokenizer)
        self.special_tokens: dict[str, int] = dict(self.manifest.get("special_tokens", {}))
        self.eos_id = self.special_tokens.get("<|eos|>", 1)
        self.shards: list[np.ndarray] = []
        counts = []
        for entry in splits[split]["shards"]:
            path = verify_shard(self.data_dir, entry, self.dtype, checksum=verify)
            arr = np.memmap(path, dtype=self.dtype, mode="r")
            if verify and arr.size and int(arr.max()) >= self.vocab_size:
                raise UserError(f"{path}: token id {int(arr.max())} >= vocab size {self.vocab_size} "
                                "(shard and tokenizer do not match)")
            self.shards.append(arr)
            counts.append(max(0, (arr.size - 1) // self.seq_len))
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if len(self) == 0:
            raise UserError(f"{self.data_dir}: split {split!r} has {splits[split]['tokens']} tokens, fewer than one "
                            f"window of seq_len+1={self.seq_len + 1}")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        i %= n
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        off = (i - int(self._starts[s])) * self.seq_len
        return torch.from_numpy(self.shards[s][off: off + self.seq_len + 1].astype(np.int64))


class TokenLoader:
    """Batches of ``[batch_size, seq_len + 1]`` windows; deterministic, shuffled per epoch, DP-sharded."""

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} must be in [0, world_size={world_size})")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.global_batch = self.batch_size * self.world_size
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"{dataset.data_dir}: split {dataset.split!r} has {len(dataset)} windows of "
                            f"{dataset.seq_len + 1} tokens, fewer than one global batch ({self.global_batch})")
        self.epoch, self.sample = 0, 0  # sample: windows consumed in this epoch, over all ranks
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.dataset)), self.epoch
        return self._perm

    def next_indices(self) -> list[int]:
        """The dataset indices of this rank's next batch (advances the loader)."""
        if self.sample + self.global_batch > self.steps_per_epoch * self.global_batch:
            self.epoch, self.sample = self.epoch + 1, 0
        start = self.sample + self.rank * self.batch_size
        idx = self._permutation()[start: start + self.batch_size]
        self.sample += self.global_batch
        return [int(i) for i in idx]

    def next_batch(self) -> torch.Tensor:
        return torch.stack([self.dataset[i] for i in self.next_indices()])

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "sample": self.sample, "seed": self.seed, "num_windows": len(self.dataset),
                "seq_len": self.dataset.seq_len, "split": self.dataset.split}

    def load_state_dict(self, d: dict) -> None:
        for key in ("num_windows", "seq_len"):
            mine = self.state_dict()[key]
            if key in d and int(d[key]) != mine:
                raise UserError(f"loader state does not fit this dataset: {key}={d[key]} in the checkpoint, {mine} now")
        self.epoch, self.seed = int(d["epoch"]), int(d["seed"])
        # a different global batch (DP size) resumes at the last whole batch before the position
        self.sample = int(d["sample"]) // self.global_batch * self.global_batch


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per position, the index of its packed document (a new one starts after each eos)."""
    is_eos = (tokens == eos_id).long()
    return torch.cumsum(is_eos, dim=-1) - is_eos  # the eos itself belongs to the document it ends


def document_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Boolean ``[..., T, T]``: causal attention that stays inside each packed document."""
    doc = document_ids(tokens, eos_id)
    t = tokens.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
    return (doc.unsqueeze(-1) == doc.unsqueeze(-2)) & causal


def special_token_ids(data_dir: str | Path) -> dict[str, int]:
    """{"<|bos|>": 0, ...} as recorded in the manifest."""
    return dict(read_manifest(data_dir)["special_tokens"])


# the brief names the loader both ways
DataLoaderState = TokenLoader
