"""Partial FC: a margin head sharded by class range over the workers, with sampled negatives.

insightface's answer to FR at 100k-millions of identities (An et al., "Partial FC", 2021;
``arcface_torch/partial_fc_v2.py``), written for this platform: the ``[C, D]`` class centres are cut into
contiguous class ranges, one per worker (uneven shards allowed). Each step

1. gathers every worker's embeddings and labels (an autograd all-gather: the global batch, ``[N, D]``);
2. keeps every class of this worker's range that the global batch holds (positives) and draws negatives
   uniformly until ``sample_rate`` of the range is kept;
3. computes the cosines to the kept centres, the margin on each row's target class (on the shard that owns
   it), and the softmax cross-entropy across shards in the log-sum-exp form: a max and a sum are all-reduced
   per row, ``[N]`` each, so no identities-sized tensor crosses the network.

Every worker computes the same loss, the mean over the global batch. Gradients are exact: each shard's
weight gradient is the full head's rows, each worker's embedding gradient the full head's rows of its
embeddings (the gathered gradient is summed over workers). A data-parallel wrapper that *averages* the
backbone's gradients over ``W`` workers (DDP, DeepSpeed) needs them ``W`` times larger:
:func:`data_parallel_embeddings` does that.

The head's parameters stay outside the data-parallel engine (it would average, broadcast and partition
them, mixing the shards) and are stepped by :class:`RowAdamW`, which moves only the rows a step sampled.
Collectives go through ``torch.distributed`` with whatever backend the group has: gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from facemae.losses.margin import arcface_target, cosface_target

SHARD_FILE = "head_shard_rank{rank:03d}.pt"  # one per worker, beside DeepSpeed's files in a checkpoint's tag folder
_INIT_ROWS = 4096  # class centres are drawn in blocks of this many rows, each from its own seed: the same
# centre for a class whatever the number of workers


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of the classes worker ``rank`` of ``world_size`` owns: contiguous, the first
    ``num_classes % world_size`` workers one class more."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} workers")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _world(group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("Partial FC runs inside a torch.distributed process group (Ray Train sets one up on its "
                           "workers; the local mode starts a one-rank gloo group)")
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherRows(torch.autograd.Function):
    """All-gather of ``[n_r, D]`` rows (sizes may differ per worker) into ``[sum n_r, D]``; the backward sums the
    global gradient over workers and returns this worker's rows."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:  # type: ignore[override]
        rank = dist.get_rank(group)
        ctx.group, ctx.offset, ctx.size = group, sum(sizes[:rank]), sizes[rank]
        return _gather(local, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.offset:ctx.offset + ctx.size], None, None


def _gather(local: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
    """Rows of every worker, in rank order (padded to the largest for the collective, then trimmed)."""
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _SumOverWorkers(torch.autograd.Function):
    """All-reduce SUM whose backward passes the gradient through unchanged: every worker computes the same
    loss from the sum, so each worker's own term receives that loss's gradient once, on its own worker."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def data_parallel_embeddings(embeddings: torch.Tensor, world_size: int) -> torch.Tensor:
    """``embeddings`` unchanged, with their gradient multiplied by ``world_size``: a data-parallel engine
    averages the backbone's gradients over the workers, while Partial FC's loss is already the global batch's
    mean (as insightface's ``AllGatherFunc``, which multiplies by the world size for DDP)."""
    return embeddings if world_size == 1 else _ScaleGrad.apply(embeddings, float(world_size))


_MARGINS: dict[str, Callable[..., torch.Tensor]] = {"arcface": arcface_target, "cosface": cosface_target}


class PartialFC(nn.Module):
    """This worker's shard of a margin head over ``num_classes`` identities.

    Args:
        embedding_size: ``D``.
        num_classes: ``C``, all workers together; each owns :func:`class_range`.
        margin: ``arcface`` or ``cosface`` (the same target logit as :mod:`facemae.losses.margin`'s heads).
        s: Logit scale.
        m: Margin (ArcFace: radians, CosFace: cosine).
        sample_rate: Share of this worker's classes each step scores: every positive of the global batch, and
            uniform negatives up to ``ceil(sample_rate * classes)``. 1.0 is the exact full softmax.
        group: The process group (default: the world).
        seed: Seeds the class centres (per block of rows: the same centres for any number of workers) and the
            negatives (per step and shard).
    """

    def __init__(self, embedding_size: int, num_classes: int, *, margin: str = "arcface", s: float = 64.0,
                 m: float = 0.5, sample_rate: float = 1.0, group: Any = None, seed: int = 0) -> None:
        super().__init__()
        if margin not in _MARGINS:
            raise ValueError(f"unknown margin {margin!r}; choose one of {sorted(_MARGINS)}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"partial_fc.sample_rate={sample_rate} must be in (0, 1] (1.0 = every class each step)")
        rank, world_size = _world(group)
        if num_classes < max(2, world_size):
            raise ValueError(f"Partial FC over {world_size} workers needs at least {max(2, world_size)} classes, "
                             f"got {num_classes}; use model.head=full or fewer workers")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.rank, self.world_size, self.group = rank, world_size, group
        self.start, self.stop = class_range(num_classes, world_size, rank)
        self.margin, self.s, self.m, self.sample_rate, self.seed = margin, s, m, sample_rate, seed
        self._target = _MARGINS[margin]
        self.weight = nn.Parameter(init_centres(self.start, self.stop, embedding_size, seed=seed))
        # (local rows, their sampled centres as a leaf) of each forward since the last optimizer step (rate < 1)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def num_local(self) -> int:
        return self.stop - self.start

    def sample(self, labels: torch.Tensor, *, step: int = 0) -> torch.Tensor | None:
        """The local rows this step scores, sorted, or None for all of them (rate 1.0).

        Every local class among ``labels`` (the global batch) is kept; negatives are drawn uniformly, from a
        generator seeded by ``(seed, start, step)`` so that a resumed run draws what it would have drawn.
        """
        if self.sample_rate >= 1.0:
            return None
        want = math.ceil(self.sample_rate * self.num_local)
        owned = labels[(labels >= self.start) & (labels < self.stop)] - self.start
        positives = torch.unique(owned)
        if len(positives) >= want:
            return positives
        generator = torch.Generator(device=self.weight.device).manual_seed(
            (self.seed * 1_000_003 + self.start * 7_919 + step) % (1 << 63))
        score = torch.rand(self.num_local, generator=generator, device=self.weight.device)
        score[positives] = 2.0  # above every draw: always kept
        return torch.topk(score, want, sorted=False).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, *, step: int = 0) -> dict[str, torch.Tensor]:
        """The global batch's loss and top-1 accuracy (over the scored classes), equal on every worker.

        Args:
            embeddings: ``[n, D]``, this worker's (not normalised; any float dtype: computed in fp32).
            labels: ``[n]`` int64 class indices in ``[0, num_classes)``.
            step: The optimizer step (seeds the negatives).
        """
        sizes = self._sizes(len(labels), embeddings.device)
        emb = _GatherRows.apply(embeddings.float(), sizes, self.group)  # (N, D)
        labels = _gather(labels.view(-1, 1), sizes, self.group).view(-1)  # (N,)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {int(labels.min())}.."
                             f"{int(labels.max())}; the head was built for fewer identities than the data holds")
        index = self.sample(labels, step=step)
        if index is None:
            centres = self.weight
        else:
            # The sampled centres as a leaf of their own: backward leaves a [k, D] gradient there, not a dense
            # shard-sized one (index_select's backward would allocate the whole shard's and scatter into it).
            centres = self.weight.detach()[index].requires_grad_(torch.is_grad_enabled() and self.weight.requires_grad)
            if centres.requires_grad:
                self._pending.append((index, centres))
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(centres, dim=1)).clamp(-1.0, 1.0)  # (N, k)
        rows, cols = self._targets(labels, index)
        target = self._target(cos[rows, cols], m=self.m)
        logits = cos.index_put((rows, cols), target) * self.s
        loss = self._cross_entropy(logits, rows, cols, n=len(labels))
        with torch.no_grad():
            accuracy = self._accuracy(cos, rows, cols, n=len(labels))
        return {"loss": loss, "accuracy": accuracy}

    def _sizes(self, n: int, device: torch.device) -> list[int]:
        size = torch.tensor([n], device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        return [int(s) for s in sizes]

    def _targets(self, labels: torch.Tensor, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The global rows whose class this shard scores, and that class's column among the scored ones."""
        rows = ((labels >= self.start) & (labels < self.stop)).nonzero().view(-1)
        local = labels[rows] - self.start
        return rows, local if index is None else torch.searchsorted(index, local)

    def _cross_entropy(self, logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *, n: int) -> torch.Tensor:
        """Mean softmax cross-entropy over the global batch, the classes spread over the workers."""
        with torch.no_grad():
            top = logits.max(dim=1).values if logits.shape[1] else logits.new_full((n,), -math.inf)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)  # a shift: no gradient of its own
        total = _SumOverWorkers.apply(torch.exp(logits - top[:, None]).sum(dim=1), self.group)  # (N,)
        target = logits.new_zeros(n).index_put((rows,), logits[rows, cols])
        target = _SumOverWorkers.apply(target, self.group)  # (N,): the owner's target logit
        return (torch.log(total) + top - target).mean()

    def _accuracy(self, cos: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *, n: int) -> torch.Tensor:
        best = cos.max(dim=1).values if cos.shape[1] else cos.new_full((n,), -2.0)
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=self.group)
        target = cos.new_zeros(n).index_put((rows,), cos[rows, cols])
        dist.all_reduce(target, op=dist.ReduceOp.SUM, group=self.group)
        return (target >= best).float().mean()

    def take_gradient(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(rows, grad)``: the local rows a backward reached since the last call and their gradient (summed
        over micro-batches), or ``(None, weight.grad)`` at rate 1.0; ``grad`` None when no backward ran. Resets."""
        if self.sample_rate >= 1.0:
            grad, self.weight.grad = self.weight.grad, None
            return None, grad
        pending, self._pending = [(i, c.grad) for i, c in self._pending if c.grad is not None], []
        if not pending:  # no backward reached this shard since the last step: nothing to move
            return torch.zeros(0, dtype=torch.int64, device=self.weight.device), None
        rows = torch.unique(torch.cat([index for index, _ in pending]))  # sorted
        grad = torch.zeros(len(rows), self.embedding_size, device=self.weight.device)
        for index, part in pending:
            grad.index_add_(0, torch.searchsorted(rows, index), part.float())
        return rows, grad


def init_centres(start: int, stop: int, embedding_size: int, *, seed: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of the class centres, N(0, 0.01) as insightface's PartialFC, drawn in blocks of
    ``_INIT_ROWS`` rows from a generator seeded by ``(seed, block)``: a class's centre does not depend on
    how the head is sharded."""
    out = torch.empty(stop - start, embedding_size)
    for block in range(start // _INIT_ROWS, -(-stop // _INIT_ROWS)):
        lo, hi = block * _INIT_ROWS, (block + 1) * _INIT_ROWS
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.randn(_INIT_ROWS, embedding_size, generator=generator) * 0.01
        a, b = max(lo, start), min(hi, stop)
        out[a - start:b - start] = rows[a - lo:b - lo]
    return out


@dataclass
class HeadStep:
    """What one optimizer step of a shard did."""

    grad_norm: float  # of the whole head (every shard), before clipping
    rows: int  # rows this shard moved
    skipped: bool  # nothing moved: the engine skipped the step, or the head's gradient was not finite


class RowAdamW:
    """AdamW for a :class:`PartialFC` shard that moves only the rows scored since its last step.

    A row no step sampled keeps its weight, its moments and its own step count (bias corrections are per row):
    decaying or moving it on momentum would pull unseen identities' centres with no evidence, and at rate 0.1
    a centre is scored about one step in ten. At rate 1.0 every row steps every time: plain AdamW, with
    ``torch.optim.AdamW``'s arithmetic. (insightface's PartialFC V2 steps the whole shard with SGD, so
    momentum and weight decay move unsampled rows there.)

    Args:
        head: The shard; :meth:`PartialFC.take_gradient` hands over what backward left (scaled by ``grad_scale``).
        betas: As ``torch.optim.AdamW`` (the platform's: (0.9, 0.95)).
        eps: As ``torch.optim.AdamW``.
        weight_decay: Decoupled, as ``torch.optim.AdamW``.
    """

    def __init__(self, head: PartialFC, *, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        self.head, self.betas, self.eps, self.weight_decay = head, betas, eps, weight_decay
        weight = head.weight
        self.exp_avg = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        self.exp_avg_sq = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        self.steps = torch.zeros(head.num_local, dtype=torch.int64, device=weight.device)

    @torch.no_grad()
    def step(self, *, lr: float, grad_scale: float = 1.0, clip: float = 0.0, skip: bool = False) -> HeadStep:
        """Applies the accumulated gradient and clears it. Collective: every worker calls it at the same steps.

        Args:
            lr: This step's learning rate (the engine's schedule).
            grad_scale: The fp16 loss scale the backward ran with: gradients are divided by it.
            clip: Clip to this norm over the whole head (every shard's sampled rows); 0 = no clipping.
            skip: The engine skipped this step (fp16 overflow): nothing moves, the gradient is dropped.
        """
        head = self.head
        rows, grad = head.take_gradient()
        if grad is None:  # no backward since the last step (as torch's optimizers, which skip such parameters)
            skip, grad = True, torch.zeros(head.num_local if rows is None else len(rows), head.embedding_size,
                                           device=head.weight.device)
        g = grad.float() / grad_scale
        squared = (g * g).sum()
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=head.group)
        norm = float(squared.sqrt())
        moved = head.num_local if rows is None else len(rows)
        if skip or not math.isfinite(norm):
            return HeadStep(grad_norm=norm, rows=0, skipped=True)
        if clip > 0 and norm > clip:
            g = g * (clip / (norm + 1e-6))  # as DeepSpeed's and torch's clip_grad_norm_
        beta1, beta2 = self.betas
        weight = head.weight.data
        take = (lambda t: t) if rows is None else (lambda t: t[rows])
        p, m, v = take(weight), take(self.exp_avg), take(self.exp_avg_sq)
        steps = take(self.steps) + 1
        p.mul_(1 - lr * self.weight_decay)
        m.lerp_(g.to(m.dtype), 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        correction1 = (1 - beta1 ** steps.double()).to(p.dtype)[:, None]  # per row: its own step count
        correction2 = (1 - beta2 ** steps.double()).sqrt().to(p.dtype)[:, None]
        p.sub_(lr / correction1 * m / (v.sqrt() / correction2 + self.eps))
        if rows is None:
            self.steps += 1
        else:
            weight[rows], self.exp_avg[rows], self.exp_avg_sq[rows], self.steps[rows] = p, m, v, steps
        return HeadStep(grad_norm=norm, rows=moved, skipped=False)

    def to(self, device: torch.device) -> "RowAdamW":
        self.exp_avg, self.exp_avg_sq = self.exp_avg.to(device), self.exp_avg_sq.to(device)
        self.steps = self.steps.to(device)
        return self

    def zero_grad(self) -> None:
        self.head.take_gradient()


def save_shard(head: PartialFC, optimizer: RowAdamW, folder: str | Path) -> Path:
    """Writes this worker's shard (weights, optimizer state, class range, world size) into ``folder``."""
    path = Path(folder) / SHARD_FILE.format(rank=head.rank)
    state = {"start": head.start, "stop": head.stop, "num_classes": head.num_classes,
             "embedding_size": head.embedding_size, "world_size": head.world_size,
             "weight": head.weight.detach().cpu(), "exp_avg": optimizer.exp_avg.cpu(),
             "exp_avg_sq": optimizer.exp_avg_sq.cpu(), "steps": optimizer.steps.cpu()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def _shards(folder: str | Path, *, num_classes: int | None = None,
            embedding_size: int | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """The shard files of ``folder`` (memory-mapped), checked to tile ``[0, num_classes)`` exactly once."""
    files = sorted(Path(folder).glob(SHARD_FILE.replace("{rank:03d}", "*")))
    if not files:
        raise ValueError(f"{folder} holds no Partial FC shards ({SHARD_FILE.format(rank=0)}, ...): the checkpoint "
                         "was written with model.head=full; resume it with model.head=full")
    shards = [(f, torch.load(f, map_location="cpu", weights_only=True, mmap=True)) for f in files]
    shards.sort(key=lambda item: item[1]["start"])
    first = shards[0][1]
    total, width = first["num_classes"], first["embedding_size"]
    if num_classes is not None and (total, width) != (num_classes, embedding_size):
        raise ValueError(f"{folder}: the Partial FC shards hold {total} classes x {width} but this run has "
                         f"{num_classes} x {embedding_size}; resume on the same dataset and model.embedding_size")
    edge = 0
    for f, state in shards:
        if state["start"] != edge or (state["num_classes"], state["embedding_size"]) != (total, width):
            raise ValueError(f"{folder}: Partial FC shard {f.name} covers classes [{state['start']}, {state['stop']}) "
                             f"where [{edge}, ...) of {total} was expected; a shard file is missing or from another run")
        edge = state["stop"]
    if edge != total:
        raise ValueError(f"{folder}: the Partial FC shards end at class {edge} of {total}; a shard file is missing")
    return shards


def load_shard(head: PartialFC, optimizer: RowAdamW | None, folder: str | Path) -> None:
    """Fills this worker's shard from the shard files of a checkpoint written by any number of workers: the
    rows of its class range are cut from the files that hold them (weights and optimizer state alike).

    Raises:
        ValueError: No shard files, shards that do not tile the classes, or another class count or width.
    """
    device = head.weight.device
    with torch.no_grad():
        for _, state in _shards(folder, num_classes=head.num_classes, embedding_size=head.embedding_size):
            lo, hi = max(head.start, state["start"]), min(head.stop, state["stop"])
            if lo >= hi:
                continue
            mine, theirs = slice(lo - head.start, hi - head.start), slice(lo - state["start"], hi - state["start"])
            head.weight[mine] = state["weight"][theirs].to(device)
            if optimizer is not None:
                optimizer.exp_avg[mine] = state["exp_avg"][theirs].to(device)
                optimizer.exp_avg_sq[mine] = state["exp_avg_sq"][theirs].to(device)
                optimizer.steps[mine] = state["steps"][theirs].to(device)


def merge_shards(folder: str | Path) -> torch.Tensor:
    """The full ``[C, D]`` class centres of a checkpoint's shards, for export: an ordinary head."""
    return torch.cat([state["weight"] for _, state in _shards(folder)])
