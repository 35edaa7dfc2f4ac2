"""Language-model losses shared by every stage: next-token CE, MTP, sequence balance.

Choices:
- Labels use -100 for positions that carry no loss (padding, prompt tokens in SFT), the
  PyTorch convention, so one function serves pretraining and SFT.
- MTP depth k predicts the token k+1 ahead; its logits are [B, S-k, V] and align with
  ``labels[:, k:]``. L_MTP = (lambda / D) * sum_k CE_k (TR Eq. 24-25).
- The sequence-wise balance loss arrives summed over MoE layers from the model; it is
  multiplied by alpha here so the model stays free of training weights.
- A forward given the labels returns fused head + CE values (``model/head_loss.py``); they
  are used as they are, and logits only when the model produced them.
- Each part is returned separately (detached copies for logging) next to the total.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeforge.config import ModelConfig
from moeforge.model.head_loss import IGNORE  # one definition, used by the fused head loss too
from moeforge.model.transformer import ModelOutput


def token_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over [B, S, V] logits and [B, S] labels, ignoring IGNORE positions."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction=reduction)
    # under a vocabulary-parallel loss (tensor parallelism) the result is a replicated DTensor;
    # make it a plain tensor so the other loss parts can be added to it
    return loss.full_tensor() if hasattr(loss, "full_tensor") else loss


def lm_loss(out: ModelOutput, labels: torch.Tensor, cfg: ModelConfig, mtp_lambda: float | None = None) -> dict[str, torch.Tensor]:
    """Total training loss and its parts: {'loss', 'lm', 'mtp', 'aux'} (parts detached)."""
    # a forward given the labels has already fused head and CE (model/head_loss.py)
    lm = out.ce if out.ce is not None else token_ce(out.logits, labels)
    total = lm
    parts = {"lm": lm.detach()}
    lam = cfg.mtp_lambda if mtp_lambda is None else mtp_lambda
    ces = out.mtp_ce or [token_ce(lg, labels[:, k:]) for k, lg in enumerate(out.mtp_logits, start=1)]
    if ces:
        mtp = torch.stack(ces).mean()  # (1/D) sum_k
        total = total + lam * mtp
        parts["mtp"] = mtp.detach()
    if out.aux_loss is not None and cfg.seq_aux_alpha > 0:
        aux = cfg.seq_aux_alpha * out.aux_loss
        total = total + aux
        parts["aux"] = aux.detach()
    parts["loss"] = total
    return parts
