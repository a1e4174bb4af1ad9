"""FaceMAE: a masked autoencoder for 112x112 faces, written like facebookresearch/mae ``models_mae.py``.

Stages: ``patchify`` -> ``random_masking`` (or the owner's given mask) -> ``forward_encoder`` over the
visible tokens only -> ``forward_decoder`` with mask tokens -> ``forward_loss`` on the masked patches;
``compose`` turns a prediction into the released image.

Patch layout is row-major patches, each ``[p, p, 3]`` flattened in ``(p, q, c)`` order: the layout of
``facemae.data.masking.patchify``, so a masked shard's ``visible`` bytes are rows of ``patchify``.
Pixels are in the platform's ``[-1, 1]`` range (``facemae.models.fr``); the loss and predictions are
in that range too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from facemae.losses.reconstruction import masked_mse, normalize_patches
from facemae.models.fr import PIXEL_MEAN, PIXEL_STD


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """Cuts images into patches: ``[N, 3, H, W] -> [N, L, p*p*3]``, ``L = (H/p) * (W/p)``."""
    n, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"patch size {p} must divide the image size {h}x{w}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, q, c)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for square images: ``[N, L, p*p*3] -> [N, 3, H, W]``."""
    n, length, _ = x.shape
    side = int(round(length ** 0.5))
    if side * side != length:
        raise ValueError(f"unpatchify needs a square number of patches, got L={length}")
    x = x.reshape(n, side, side, p, p, 3)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (N, 3, h, p, w, q)
    return x.reshape(n, 3, side * p, side * p)


def _split(x: torch.Tensor, ids_shuffle: torch.Tensor, keep: int) -> tuple[torch.Tensor, ...]:
    """Keeps the first ``keep`` tokens of each row's shuffle; returns ``(x_masked, mask, ids_restore, ids_keep)``."""
    n, length, d = x.shape
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L): position of each patch in the shuffle
    ids_keep = ids_shuffle[:, :keep]  # (N, keep)
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (N, keep, D)
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (N, L) in patch order, 1 = removed
    return x_masked, mask, ids_restore, ids_keep


def random_masking(x: torch.Tensor, ratio: float, *,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Per-image random masking by argsort of uniform noise, as MAE.

    Args:
        x: ``[N, L, D]`` tokens.
        ratio: Fraction removed; ``keep = int(L * (1 - ratio))`` tokens stay.
        generator: Seeded generator of the noise; a CPU generator works for tokens on any device.

    Returns:
        ``x_masked [N, keep, D]``, ``mask [N, L]`` (1 = removed), ``ids_restore [N, L]``,
        ``ids_keep [N, keep]``.
    """
    n, length, _ = x.shape
    keep = int(length * (1 - ratio))
    if not 1 <= keep <= length:
        raise ValueError(f"mask ratio {ratio} keeps {keep} of {length} patches; use a ratio in [0, 1) "
                         "that keeps at least one")
    device = generator.device if generator is not None else x.device
    noise = torch.rand(n, length, generator=generator, device=device).to(x.device)  # (N, L) in [0, 1)
    return _split(x, torch.argsort(noise, dim=1), keep)


def given_masking(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Masking with a given mask (the owner's, from a masked shard) instead of a random one.

    Args:
        x: ``[N, L, D]`` tokens.
        mask: ``[N, L]``, 1 = removed, 0 = visible; every row keeps the same number of patches.

    Returns:
        As :func:`random_masking`; ``ids_keep`` is ascending, the order of a shard's ``visible``.
    """
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the {tuple(x.shape[:2])} "
                         "patches; was it written with another patch size?")
    visible = (mask == 0).sum(dim=1)
    if int(visible.min()) != int(visible.max()) or int(visible.min()) < 1:
        raise ValueError(f"every row of a given mask must keep the same number (>= 1) of patches, got "
                         f"{int(visible.min())}..{int(visible.max())}; batch masks made with one ratio")
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # visible first, ascending
    return _split(x, ids_shuffle, int(visible[0]))


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, *, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings, as MAE ``util/pos_embed.py``.

    Returns:
        ``[grid_size**2 (+1 zero row for the cls token), embed_dim]`` float32.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by 4 for 2-D sin-cos embeddings")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # MAE's np.meshgrid(grid_w, grid_h)
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = torch.outer(pos.reshape(-1), omega)  # (L, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (L, D/2)

    emb = torch.cat([one_axis(grid_w), one_axis(grid_h)], dim=1).float()  # (L, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim), emb], dim=0)
    return emb


class FaceMAE(nn.Module):
    """Masked autoencoder with a ViT encoder over the visible patches and a light ViT decoder.

    Args:
        img_size: Input side in pixels.
        patch_size: ``p``; ``L = (img_size / p)^2`` tokens.
        embed_dim: Encoder width.
        depth: Encoder blocks.
        num_heads: Encoder attention heads.
        decoder_embed_dim: Decoder width.
        decoder_depth: Decoder blocks.
        decoder_num_heads: Decoder attention heads.
        mlp_ratio: MLP hidden width over block width.
        norm_layer: Normalisation class of the blocks.
        norm_pix_loss: Score per-patch-normalised targets (pre-training studies only: such
            predictions cannot be composed into pixels, see :meth:`compose`).
    """

    def __init__(self, img_size: int = 112, *, patch_size: int = 8, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0,
                 norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 norm_pix_loss: bool = False) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide img_size={img_size}")
        for width, heads in ((embed_dim, num_heads), (decoder_embed_dim, decoder_num_heads)):
            if width % heads:
                raise ValueError(f"width {width} must be divisible by its {heads} attention heads")
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        grid = img_size // patch_size

        # Encoder: patches -> tokens (+ fixed sin-cos positions) -> blocks over visible tokens.
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid, cls_token=True)[None])
        self.blocks = nn.ModuleList(_blocks(embed_dim, num_heads, depth, mlp_ratio, norm_layer))
        self.norm = norm_layer(embed_dim)

        # Decoder: visible latents + mask tokens (+ positions) -> blocks -> pixels of every patch.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed",
                             sincos_pos_embed_2d(decoder_embed_dim, grid, cls_token=True)[None])
        self.decoder_blocks = nn.ModuleList(
            _blocks(decoder_embed_dim, decoder_num_heads, decoder_depth, mlp_ratio, norm_layer))
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        # As MAE: patch projection initialised like a linear layer, tokens N(0, 0.02), xavier linears.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def num_patches(self) -> int:
        """``L``, tokens per image."""
        return self.pos_embed.shape[1] - 1

    def forward_encoder(self, imgs: torch.Tensor, *, mask_ratio: float | None = None,
                        mask: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """Encodes the visible patches only.

        Args:
            imgs: ``[N, 3, H, W]`` in ``[-1, 1]``; pixels of masked patches are never read.
            mask_ratio: Fraction drawn at random per image; used when ``mask`` is None.
            mask: ``[N, L]`` given mask (1 = removed), e.g. the owner's; wins over ``mask_ratio``.
            generator: Seeded generator for the random mask.

        Returns:
            ``latent [N, 1 + keep, D]`` (cls first), ``mask [N, L]``, ``ids_restore [N, L]``.
        """
        # Position tables are fixed fp32 buffers; DeepSpeed casts parameters, not buffers, to bf16/fp16.
        x = self.patch_embed(imgs)  # (N, L, D)
        x = x + self.pos_embed[:, 1:, :].to(x.dtype)
        if mask is not None:
            x, mask, ids_restore, _ = given_masking(x, mask)
        elif mask_ratio is not None:
            x, mask, ids_restore, _ = random_masking(x, mask_ratio, generator=generator)
        else:
            raise ValueError("forward_encoder needs mask_ratio (random masks) or mask (a given mask)")
        cls = (self.cls_token + self.pos_embed[:, :1, :].to(x.dtype)).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + keep, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predicts every patch from the visible latents: ``[N, 1 + keep, D] -> [N, L, p*p*3]``."""
        x = self.decoder_embed(latent)  # (N, 1 + keep, Dd)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd) in shuffle order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # patch order
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed.to(x.dtype)  # (N, 1 + L, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]  # drop cls: (N, L, p*p*3)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE on the masked patches: ``imgs [N, 3, H, W]``, ``pred [N, L, p*p*3]``, ``mask [N, L]`` -> scalar."""
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            target = normalize_patches(target)
        return masked_mse(pred, target, mask)

    def forward(self, imgs: torch.Tensor, *, mask_ratio: float = 0.75, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks, encodes, decodes and scores; arguments as :meth:`forward_encoder`.

        Returns:
            ``loss`` (scalar), ``pred [N, L, p*p*3]``, ``mask [N, L]``.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio=mask_ratio, mask=mask,
                                                         generator=generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def reconstruct(self, imgs: torch.Tensor, mask: torch.Tensor, *, paste_visible: bool = True) -> torch.Tensor:
        """The released images of a given mask: :meth:`forward` and :meth:`compose` without the loss,
        which deployment never reads (a tenth of the tiny FaceMAE's forward).

        Args:
            imgs: ``[N, 3, H, W]`` in ``[-1, 1]``; only the visible patches are read.
            mask: ``[N, L]``, 1 = removed.
            paste_visible: False releases the prediction everywhere.

        Returns:
            ``[N, 3, H, W]`` in ``[-1, 1]``, as :meth:`compose` returns them.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask=mask)
        return self.compose(imgs, self.forward_decoder(latent, ids_restore), mask, paste_visible=paste_visible)

    def compose(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, *,
                paste_visible: bool = True) -> torch.Tensor:
        """The released image: predicted masked patches, the owner's visible patches pasted back.

        Args:
            imgs: ``[N, 3, H, W]`` originals or masked inputs (only visible patches are read).
            pred: ``[N, L, p*p*3]`` decoder output.
            mask: ``[N, L]``, 1 = removed.
            paste_visible: False releases the prediction everywhere.

        Returns:
            ``[N, 3, H, W]`` in ``[-1, 1]`` (not clamped, so gradients reach every prediction).
        """
        if self.norm_pix_loss:
            raise ValueError("a FaceMAE trained with norm_pix_loss predicts per-patch-normalised values, "
                             "which cannot be composed into pixels; train with norm_pix_loss=False")
        if paste_visible:
            removed = mask.bool().unsqueeze(-1)  # (N, L, 1)
            pred = torch.where(removed, pred, patchify(imgs, self.patch_size).to(pred.dtype))
        return unpatchify(pred, self.patch_size)


def _blocks(dim: int, num_heads: int, depth: int, mlp_ratio: float,
            norm_layer: Callable[[int], nn.Module]) -> list[Block]:
    return [Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]


def masked_record_input(visible: Sequence[bytes], mask: Sequence[bytes], *, patch_size: int,
                        img_size: int = 112) -> tuple[torch.Tensor, torch.Tensor]:
    """Model input from masked-shard records: deployment reconstructs from these alone.

    Args:
        visible: Per record, the kept patches' pixels, ``[keep, p, p, 3]`` uint8 bytes, ascending.
        mask: Per record, ``L`` bytes, 1 = removed.
        patch_size: ``p`` the shard was masked with.
        img_size: Image side.

    Returns:
        ``imgs [N, 3, H, W]`` in ``[-1, 1]`` with zeros in the masked patches (never read), and
        ``mask [N, L]`` float, ready for ``forward(imgs, mask=mask)`` and ``compose``.
    """
    if len(visible) != len(mask):
        raise ValueError(f"got {len(visible)} visible records but {len(mask)} masks")
    length, width = (img_size // patch_size) ** 2, patch_size * patch_size * 3
    if (got := next((len(m) for m in mask if len(m) != length), None)) is not None:
        raise ValueError(f"masks hold {got} patches but patch_size={patch_size} makes {length}; "
                         "pass the patch size the shard was masked with")
    masks = torch.from_numpy(np.frombuffer(b"".join(mask), dtype=np.uint8).copy()).view(len(mask), length)  # (N, L)
    visible_rows = masks == 0
    kept = visible_rows.sum(dim=1).tolist()
    for row, (vis, k) in enumerate(zip(visible, kept)):
        if len(vis) != k * width:
            raise ValueError(f"record {row} holds {len(vis) // width} visible patches but its mask shows {k}; "
                             "the shard is corrupt or used another patch size")
    # Each record's kept patches in ascending order, records one after another: the order in which a
    # boolean index walks [N, L], so one assignment places them all.
    pixels = torch.from_numpy(np.frombuffer(b"".join(visible), dtype=np.uint8).copy()).view(-1, width)
    patches = torch.zeros(len(mask), length, width)  # (N, L, p*p*3)
    patches[visible_rows] = (pixels.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD
    return unpatchify(patches, patch_size), masks.float()
