"""Margin heads of face recognition: the class centres and the logits with an angular margin.

Both heads follow insightface ``arcface_torch/losses.py`` (``CombinedMarginLoss``): logits are
``s * cos`` between the L2-normalised embedding and the L2-normalised class centres, with the
margin applied to the target class only. The cross-entropy on those logits is the caller's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# cos is clamped off +-1 so that sqrt(1 - cos^2) keeps a finite gradient.
_COS_EPS = 1e-7


def arcface_target(cos_target: torch.Tensor, *, m: float, easy_margin: bool = False) -> torch.Tensor:
    """ArcFace's target cosine ``cos(theta + m)``, ``[N] -> [N]`` (see :class:`ArcFace` for ``easy_margin``)."""
    cos_t = cos_target.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS)
    sin_t = torch.sqrt(1.0 - cos_t * cos_t)
    cos_t_m = cos_t * math.cos(m) - sin_t * math.sin(m)  # cos(theta + m)
    if easy_margin:
        return torch.where(cos_t > 0, cos_t_m, cos_t)
    # Where theta + m would pass pi (cos(theta) < cos(pi - m)), cos(theta) - m sin(m) keeps falling instead.
    return torch.where(cos_t > math.cos(math.pi - m), cos_t_m, cos_t - math.sin(math.pi - m) * m)


def cosface_target(cos_target: torch.Tensor, *, m: float) -> torch.Tensor:
    """CosFace's target cosine ``cos(theta) - m``, ``[N] -> [N]``."""
    return cos_target - m


class MarginHead(nn.Module):
    """Holds the ``[num_classes, embedding_size]`` class centres; subclasses add the margin."""

    def __init__(self, embedding_size: int, num_classes: int, *, s: float) -> None:
        super().__init__()
        if embedding_size < 1 or num_classes < 2:
            raise ValueError(f"a margin head needs embedding_size >= 1 and num_classes >= 2, got "
                             f"{embedding_size} and {num_classes}")
        if s <= 0:
            raise ValueError(f"margin head scale s={s} must be > 0")
        self.s = s
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)  # as insightface's PartialFC

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine to every class centre, no margin (for accuracy and retrieval).

        Args:
            embeddings: ``[N, D]``.

        Returns:
            ``[N, C]`` in ``[-1, 1]``.
        """
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1)).clamp(-1.0, 1.0)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """The target class's cosine after the margin: ``[N] -> [N]``."""
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled logits with the margin on each row's target class.

        Args:
            embeddings: ``[N, D]`` backbone output (normalised here).
            labels: ``[N]`` int64 class indices; None gives the logits without margin (prediction).

        Returns:
            ``[N, C]`` logits for cross-entropy.
        """
        cos = self.cosine(embeddings)  # (N, C)
        if labels is None:
            return cos * self.s
        index = labels.view(-1, 1)
        target = self.target_logit(cos.gather(1, index).squeeze(1))  # (N,)
        return cos.scatter(1, index, target.unsqueeze(1).to(cos.dtype)) * self.s


class ArcFace(MarginHead):
    """Additive angular margin: the target logit is ``s * cos(theta + m)`` (Deng et al. 2019).

    Args:
        embedding_size: Embedding dimension ``D``.
        num_classes: Identities ``C``.
        s: Logit scale.
        m: Angular margin in radians.
        easy_margin: Apply the margin only where ``cos(theta) > 0``. Otherwise (the default, as
            insightface) where ``theta + m`` would pass ``pi``, and ``cos(theta + m)`` would turn
            back up, the target logit is ``cos(theta) - m * sin(m)`` instead, which keeps falling.
    """

    def __init__(self, embedding_size: int, num_classes: int, *, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False) -> None:
        super().__init__(embedding_size, num_classes, s=s)
        if not 0.0 <= m < math.pi / 2:
            raise ValueError(f"ArcFace margin m={m} must be in [0, pi/2) radians (0.5 is the standard)")
        self.m = m
        self.easy_margin = easy_margin

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return arcface_target(cos_target, m=self.m, easy_margin=self.easy_margin)


class CosFace(MarginHead):
    """Additive cosine margin: the target logit is ``s * (cos(theta) - m)`` (Wang et al. 2018).

    Args:
        embedding_size: Embedding dimension ``D``.
        num_classes: Identities ``C``.
        s: Logit scale.
        m: Cosine margin.
    """

    def __init__(self, embedding_size: int, num_classes: int, *, s: float = 64.0, m: float = 0.4) -> None:
        super().__init__(embedding_size, num_classes, s=s)
        if not 0.0 <= m < 1.0:
            raise ValueError(f"CosFace margin m={m} must be in [0, 1) (0.4 is the standard)")
        self.m = m

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cosface_target(cos_target, m=self.m)


MARGIN_HEADS: dict[str, type[MarginHead]] = {"arcface": ArcFace, "cosface": CosFace}


def build_head(name: str, embedding_size: int, num_classes: int, *, s: float, m: float) -> MarginHead:
    """Builds the margin head called ``name`` (a key of :data:`MARGIN_HEADS`).

    Raises:
        ValueError: An unknown name; the message lists the known ones.
    """
    if name not in MARGIN_HEADS:
        raise ValueError(f"unknown margin head {name!r}; choose one of {sorted(MARGIN_HEADS)}")
    return MARGIN_HEADS[name](embedding_size, num_classes, s=s, m=m)
