"""Auxiliary (instance-level) losses that some aggregators declare via ``model.aux_loss``.

The training code calls, for classification tasks::

    aux = AUX_LOSSES.get(model.aux_loss)(out, labels, mask, **model.aux_loss_kwargs)
    loss = bag_loss + weight * aux

Every loss has the signature ``(output: MILOutput, labels [B] long, mask [B, N] bool,
**kwargs) -> scalar tensor`` and ignores padded tiles. With a single output (``C == 1``,
binary with a sigmoid head) labels must be 0/1 and class 0 means "not the one class".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mil.models.base import MILOutput
from mil.registry import Registry

AUX_LOSSES: Registry[Callable[..., torch.Tensor]] = Registry("auxiliary loss")


def _aux(output: MILOutput, key: str, loss_name: str) -> torch.Tensor:
    if key not in output.aux:
        raise KeyError(f"loss {loss_name!r} needs output.aux[{key!r}]; got keys {sorted(output.aux)}")
    return output.aux[key]


def _check_labels(labels: torch.Tensor, n_classes: int, batch: int, loss_name: str) -> None:
    if labels.shape != (batch,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{loss_name}: labels must be integer [B={batch}], got {labels.dtype} {tuple(labels.shape)}"
        )
    top = max(n_classes, 2)  # C == 1 is a binary task with labels 0/1
    if labels.numel() and (labels.min() < 0 or labels.max() >= top):
        raise ValueError(f"{loss_name}: labels must lie in [0, {top}), got {labels.tolist()}")


@AUX_LOSSES.register("clam_instance")
def clam_instance_loss(
    output: MILOutput,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    k_sample: int = 8,
    subtyping: bool = False,
) -> torch.Tensor:
    """CLAM's instance-level clustering loss (Lu et al. 2021), with cross-entropy.

    For each bag with label y, class y's branch: its k most attended tiles are pseudo-labelled
    positive and its k least attended negative for class y's instance classifier. With
    ``subtyping``, every other class c's k most attended tiles are negative for classifier c,
    and the bag's loss is averaged over classes (as in the reference code). k is clamped to
    the bag: ``min(k_sample, n // 2)`` for the in-class pair so the positive and negative
    sets never overlap (a one-tile bag adds no in-class term), ``min(k_sample, n)`` otherwise.
    Needs ``aux["instance_logits"]`` [B, C, N, 2] and ``aux["attention"]`` [B, C, N].
    The result is the mean over bags.
    """
    logits = _aux(output, "instance_logits", "clam_instance").float()  # [B, C, N, 2]
    attention = _aux(output, "attention", "clam_instance").float()  # [B, C, N]
    B, C, N, _ = logits.shape
    assert attention.shape == (B, C, N) and mask.shape == (B, N), "aux shapes disagree with the mask"
    _check_labels(labels, C, B, "clam_instance")
    # With one output, only label 1 is "in class" for the single branch.
    in_class = labels if C > 1 else torch.where(labels == 1, 0, -1)
    total = logits.sum() * 0.0  # keeps the graph when no bag contributes
    for b in range(B):
        valid = mask[b].nonzero(as_tuple=True)[0]  # [n]
        n = valid.numel()
        bag_loss = total.new_zeros(())
        for c in range(C):
            scores, inst = attention[b, c, valid], logits[b, c, valid]  # [n], [n, 2]
            if c == int(in_class[b]):
                k = min(k_sample, n // 2)
                if k == 0:
                    continue
                top = scores.topk(k).indices
                bottom = (-scores).topk(k).indices
                targets = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(inst.device)
                bag_loss = bag_loss + F.cross_entropy(inst[torch.cat([top, bottom])], targets)
            elif subtyping and n > 0:
                k = min(k_sample, n)
                top = scores.topk(k).indices
                targets = torch.zeros(k, dtype=torch.long, device=inst.device)
                bag_loss = bag_loss + F.cross_entropy(inst[top], targets)
        total = total + (bag_loss / C if subtyping else bag_loss)
    return total / max(B, 1)


@AUX_LOSSES.register("dsmil_max_instance")
def dsmil_max_instance_loss(output: MILOutput, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DSMIL's max-instance loss (Li et al. 2021): the bag label on each class's top valid tile score.

    ``C >= 2``: cross-entropy over the per-class max instance scores; ``C == 1``: binary
    cross-entropy with logits. Needs ``aux["instance_logits"]`` [B, N, C]. Mean over bags.
    The reference trains with ``0.5 * bag_loss + 0.5 * this``, i.e. weight 1.
    """
    inst = _aux(output, "instance_logits", "dsmil_max_instance").float()  # [B, N, C]
    B, N, C = inst.shape
    assert mask.shape == (B, N), f"mask {tuple(mask.shape)} != instance scores {(B, N)}"
    _check_labels(labels, C, B, "dsmil_max_instance")
    top = inst.masked_fill(~mask[..., None], torch.finfo(inst.dtype).min).amax(dim=1)  # [B, C]
    if C == 1:
        return F.binary_cross_entropy_with_logits(top[:, 0], labels.float())
    return F.cross_entropy(top, labels.long())
