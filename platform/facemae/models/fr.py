"""Face-recognition backbone: IResNet, as insightface ``arcface_torch/backbones/iresnet.py``.

One architecture serves three roles: the frozen IRM teacher, the privacy judge (a separately trained
instance, never the teacher) and the downstream FR models trained on released faces.

Pixel convention, shared by every model of the platform (FaceMAE reads and predicts the same range,
so the teacher sees reconstructions on the scale it was trained on): RGB ``[N, 3, 112, 112]`` float
in ``[-1, 1]``, ``((x / 255) - 0.5) / 0.5`` as insightface; :func:`to_model_range` and
:func:`to_uint8` convert.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images to the model's input range.

    Args:
        pixels: ``[N, H, W, 3]`` uint8 (as decoded from shards).

    Returns:
        ``[N, 3, H, W]`` float32 in ``[-1, 1]``.
    """
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"to_model_range needs [N, H, W, 3] uint8 pixels, got {pixels.dtype} "
                         f"{tuple(pixels.shape)}")
    x = pixels.permute(0, 3, 1, 2).float() / 255.0
    # NCHW-contiguous, the plain layout every model takes (IResNet makes its own channels-last copy).
    return ((x - PIXEL_MEAN) / PIXEL_STD).contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_model_range`, clamped and rounded: ``[N, 3, H, W] -> [N, H, W, 3]`` uint8."""
    x = (images.detach() * PIXEL_STD + PIXEL_MEAN) * 255.0
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class _PReLUFunction(torch.autograd.Function):
    """``torch.prelu`` with a backward of ReLU's kernel, two elementwise ops and one reduction, bit-identical
    to aten's.

    aten's CPU backward (``_prelu_kernel_backward``) writes a full-size per-element weight gradient before
    reducing it, and does so even for a frozen weight: forward + backward of one ``[32, 8, 112, 112]``
    activation on one thread take 18-22 ms with it and 5-8 ms here (frozen / trained slope).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,  # type: ignore[override]
                weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.prelu(x, weight)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,  # type: ignore[override]
                 grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        through = torch.ops.aten.threshold_backward(grad, x, 0)  # grad where x > 0, else 0 (ReLU's backward)
        sloped = grad - through  # grad where x <= 0 (aten's slope w at x == 0 too), else exactly 0
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            grad_x = torch.addcmul(through, sloped, weight.view(1, -1, 1, 1))  # one term is 0: exact
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            per_element = sloped * x
            grad_w = per_element.sum().reshape(1) if weight.numel() == 1 else per_element.sum((0, 2, 3))
        return grad_x, grad_w


class PReLU(nn.PReLU):
    """``nn.PReLU`` (same parameter, same state dict) with a faster CPU backward on ``[N, C, H, W]``
    activations: :class:`_PReLUFunction` (GPUs keep aten's fused kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.device.type != "cpu":
            return super().forward(x)
        return _PReLUFunction.apply(x, self.weight)


def _conv3x3(inplanes: int, planes: int, *, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN-conv-BN-PReLU-conv-BN residual block (the "improved" ResNet unit of ArcFace)."""

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.bn1 = norm_layer(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = norm_layer(planes, eps=1e-5)
        self.prelu = PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride=stride)
        self.bn3 = norm_layer(planes, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                norm_layer(planes, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        if self.downsample is not None:
            # torch 2.14.1's CPU segfaults computing the weight gradient of a stride-2 1x1 conv on a
            # channels-last input (IResNet.forward's layout): a trained downsample reads NCHW there.
            trains = torch.is_grad_enabled() and self.downsample[0].weight.requires_grad
            identity = self.downsample(x.contiguous() if trains and x.device.type == "cpu" else x)
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.prelu(self.bn2(out)))
        return self.bn3(out) + identity


class IResNet(nn.Module):
    """IResNet: a stem, four stride-2 stages, then BN-dropout-FC-BN to the embedding.

    Args:
        layers: Blocks per stage, e.g. ``(3, 4, 14, 3)`` for r50.
        widths: Channels per stage; insightface uses ``(64, 128, 256, 512)``.
        embedding_size: Output dimension.
        img_size: Input side; four stride-2 stages leave ``img_size / 16`` (7 for 112).
        dropout: Dropout before the FC layer (insightface uses 0 for most recipes).
        block: Residual block class.
        norm_layer: 2-D normalisation class.
    """

    def __init__(self, layers: Sequence[int], *, widths: Sequence[int] = (64, 128, 256, 512),
                 embedding_size: int = 512, img_size: int = 112, dropout: float = 0.0,
                 block: type[IBasicBlock] = IBasicBlock,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet needs 4 stages of >= 1 block and 4 widths, got layers={tuple(layers)} "
                             f"widths={tuple(widths)}")
        if img_size % 16:
            raise ValueError(f"IResNet img_size={img_size} must be divisible by 16 (four stride-2 stages)")
        self.embedding_size = embedding_size
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = norm_layer(widths[0], eps=1e-5)
        self.prelu = PReLU(widths[0])
        stages, inplanes = [], widths[0]
        for planes, depth in zip(widths, layers):
            blocks = [block(inplanes, planes, stride=2, norm_layer=norm_layer)]
            blocks += [block(planes, planes, norm_layer=norm_layer) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = norm_layer(widths[-1], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[-1] * (img_size // 16) ** 2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        # As insightface: N(0, 0.1) convolutions, unit BN, and a fixed unit scale on the last BN.
        self.features.weight.requires_grad = False
        if self.features.weight.is_meta:  # shapes only (weights.check_weights): nothing to draw, and drawing
            return  # on the meta device imports torch._dynamo, 2 s of an embedding actor's start
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.features.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeds faces.

        Args:
            x: ``[N, 3, H, W]`` in ``[-1, 1]`` (see the module docstring).

        Returns:
            ``[N, embedding_size]`` embeddings, not normalised (heads and losses normalise).
        """
        # Channels-last: oneDNN's convolutions at the narrow widths of the CPU configs run several times
        # faster on it, the input gradient of the IRM teacher's first convolutions most (51 vs 9 ms for
        # fr_tiny's stem at batch 32; cuDNN's bf16 kernels prefer it too); see IBasicBlock.forward for
        # the one exception.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.prelu(self.bn1(self.conv1(x)))  # (N, w0, H, W)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, w3, H/16, W/16)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def _affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``x * scale + shift``, per channel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``bn(conv(x))`` as one convolution with a bias: each output channel's kernel scaled, its shift the bias."""
    scale, shift = _affine(bn)  # (C_out,)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)


def fold_batchnorm(model: IResNet) -> IResNet:
    """A frozen copy of ``model`` for inference and input gradients (the IRM teacher, the judge, the
    embedding pools), with every eval-mode BatchNorm that follows a convolution or feeds the FC layer
    folded into its weights: the same function up to float rounding, without those BatchNorms' passes.

    On one CPU thread, fr_tiny's forward and input gradient at batch 32 take 0.87-0.88 of the time with
    them folded (101 vs 119 ms), the main job's FaceMAE + IRM step 0.93-0.96. Each block's first BatchNorm stays: it feeds a zero-padded convolution, whose border
    pixels see the padding's zeros, not the normalised ones, so it cannot be folded forward exactly.
    ``model`` itself is not changed; the copy's parameters do not require grad.
    """
    if not isinstance(model, IResNet) or not all(
            isinstance(m, nn.BatchNorm2d) for m in (model.bn1, model.bn2)):
        raise TypeError(f"fold_batchnorm folds an IResNet with BatchNorm2d layers, got {type(model).__name__}")
    folded = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        _fold_into_conv(folded.conv1, folded.bn1)
        folded.bn1 = nn.Identity()
        for stage in (folded.layer1, folded.layer2, folded.layer3, folded.layer4):
            for block in stage:
                _fold_into_conv(block.conv1, block.bn2)
                _fold_into_conv(block.conv2, block.bn3)
                block.bn2, block.bn3 = nn.Identity(), nn.Identity()
                if block.downsample is not None:
                    _fold_into_conv(block.downsample[0], block.downsample[1])
                    block.downsample[1] = nn.Identity()
        # fc(flatten(bn2(x))): bn2's per-channel affine over the flattened (C, H, W) columns, then the
        # embedding BatchNorm1d's per-output affine; dropout is the identity in eval mode.
        fc = folded.fc
        scale, shift = _affine(folded.bn2)
        out_scale, out_shift = _affine(folded.features)
        per_column = fc.in_features // scale.numel()  # H/16 x W/16 positions per channel
        weight = fc.weight * scale.repeat_interleave(per_column)[None]
        bias = fc.bias + fc.weight @ shift.repeat_interleave(per_column)
        fc.weight = nn.Parameter(weight * out_scale[:, None], requires_grad=False)
        fc.bias = nn.Parameter(bias * out_scale + out_shift, requires_grad=False)
        folded.bn2, folded.features = nn.Identity(), nn.Identity()
    return folded
