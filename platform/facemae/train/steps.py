"""One training step per task, as plain functions of (model, batch, config) returning named losses.

Each step runs the forward pass and the losses only; the caller owns backward and the optimizer step
(``engine.backward(loss)`` / ``engine.step()`` in the distributed loop, plain autograd in tests), and
any all-gather of embeddings.

Batches are dicts of tensors on the model's device:
    ``image``       float32 ``[N, 3, 112, 112]`` in the model range ``[-1, 1]``
                    (``facemae.models.fr.to_model_range`` converts decoded uint8 pixels);
    ``identity``    int64 ``[N]``;
    ``mask``        optional ``[N, L]``, 1 = removed (the owner's mask); drawn at random when absent;
    ``teacher_emb`` optional float ``[N, D]``, the teacher's embeddings of the originals stored at
                    ingestion; computed here under ``no_grad`` when absent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facemae.config import Config
from facemae.losses.irm import irm_loss, irm_view
from facemae.losses.margin import MarginHead
from facemae.losses.partial_fc import PartialFC, data_parallel_embeddings
from facemae.models.mae import FaceMAE


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Freezes a network for use as the IRM teacher: eval mode (BN running stats, no dropout), no grads.

    Returns:
        ``teacher`` itself.
    """
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _check_frozen(teacher: nn.Module) -> None:
    if teacher.training or any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("the IRM teacher must be frozen and in eval mode; call freeze_teacher(teacher) "
                         "once after loading it (and do not call .train() on it)")


def mae_irm_step(model: FaceMAE, teacher: nn.Module, batch: dict[str, torch.Tensor], config: Config, *,
                 generator: torch.Generator | None = None, step: int | None = None) -> dict[str, torch.Tensor]:
    """FaceMAE loss on one batch: masked-patch reconstruction + ``loss.irm_weight(step)`` x IRM.

    The image IRM scores is the released image (``model.compose``: predicted masked patches, the
    visible ones pasted back unless ``loss.paste_visible`` is false), so IRM's gradient reaches the
    predictions through the frozen teacher. With ``loss.irm_view: blur`` the teacher sees both the
    originals and the released images through the same Gaussian low-pass; a stored ``teacher_emb``
    must then be of that view too (``facemae.generate.embed`` stores the view the config names, and
    training refuses a dataset embedded with another).

    Args:
        model: FaceMAE, built with ``norm_pix_loss=config.loss.norm_pix_loss``.
        teacher: Frozen FR network (:func:`freeze_teacher`); unused when ``lambda_irm`` is 0.
        batch: See the module docstring.
        config: Reads ``mask.ratio`` and ``loss``.
        generator: Seeded generator of the random masks.
        step: The optimizer step (0-based) for IRM's schedule; ``None`` = full weight.

    Returns:
        ``loss`` (with grad), and detached ``recon_loss``, ``irm_loss`` and ``irm_weight`` for logging.
    """
    if model.norm_pix_loss != config.loss.norm_pix_loss:
        raise ValueError(f"model.norm_pix_loss={model.norm_pix_loss} but loss.norm_pix_loss="
                         f"{config.loss.norm_pix_loss}; build the model with the config's setting")
    imgs = batch["image"]
    recon_loss, pred, mask = model(imgs, mask_ratio=config.mask.ratio, mask=batch.get("mask"),
                                   generator=generator)
    irm = torch.zeros((), device=imgs.device)
    cfg = config.loss
    weight = cfg.irm_weight(step, max_steps=config.train.max_steps)
    if cfg.lambda_irm > 0:
        _check_frozen(teacher)
        released = model.compose(imgs, pred, mask, paste_visible=cfg.paste_visible)
        emb_orig = batch.get("teacher_emb")
        if emb_orig is None:
            with torch.no_grad():  # (N, D), constant: the originals do not change
                emb_orig = teacher(irm_view(imgs, view=cfg.irm_view, sigma=cfg.irm_blur_sigma))
        # Before the schedule starts the loss is only logged: no graph, no backward through the teacher.
        with torch.set_grad_enabled(weight > 0 and torch.is_grad_enabled()):
            emb_recon = teacher(irm_view(released, view=cfg.irm_view, sigma=cfg.irm_blur_sigma))
            irm = irm_loss(emb_orig, emb_recon, tau=cfg.tau)
    loss = recon_loss + weight * irm
    return {"loss": loss, "recon_loss": recon_loss.detach(), "irm_loss": irm.detach(),
            "irm_weight": torch.tensor(weight)}


def fr_step(backbone: nn.Module, head: MarginHead, batch: dict[str, torch.Tensor],
            config: Config) -> dict[str, torch.Tensor]:
    """Face-recognition loss on one batch: cross-entropy on the margin head's logits.

    Args:
        backbone: FR network, ``image -> [N, D]``.
        head: Margin head built from ``config.loss`` (``build_head(loss.margin, ..., s=loss.s,
            m=loss.margin_m)``); holds the class centres.
        batch: ``image`` and ``identity``, see the module docstring.
        config: Checked against the head, so a loop cannot train with another margin than it logs.

    Returns:
        ``loss`` (with grad) and ``accuracy``: the batch's top-1 over the class centres without margin.
    """
    if (head.s, head.m) != (config.loss.s, config.loss.margin_m):
        raise ValueError(f"margin head has s={head.s}, m={head.m} but the config says loss.s={config.loss.s}, "
                         f"m={config.loss.margin_m}; build the head from config.loss")
    labels = batch["identity"]
    emb = backbone(batch["image"])  # (N, D)
    loss = F.cross_entropy(head(emb, labels), labels)
    with torch.no_grad():
        # Through head.forward, not head.cosine: ZeRO-3 gathers the class centres only in forward hooks.
        accuracy = (head(emb).argmax(dim=1) == labels).float().mean()
    return {"loss": loss, "accuracy": accuracy}


def partial_fc_step(backbone: nn.Module, head: PartialFC, batch: dict[str, torch.Tensor], *,
                    step: int) -> dict[str, torch.Tensor]:
    """Face-recognition loss with a Partial FC shard: the global batch's margin cross-entropy, the same on
    every worker (collective: every worker calls it at the same steps).

    The backbone is data-parallel (the engine averages its gradients over the workers), so its embeddings'
    gradient is scaled up by the world size (:func:`~facemae.losses.partial_fc.data_parallel_embeddings`).

    Returns:
        ``loss`` (with grad) and ``accuracy``: the global batch's top-1 over the classes this step scored.
    """
    emb = data_parallel_embeddings(backbone(batch["image"]), head.world_size)  # (n, D)
    return head(emb, batch["identity"], step=step)
