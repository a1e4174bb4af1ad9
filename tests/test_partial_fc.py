"""Partial FC (facemae.losses.partial_fc) on real gloo process groups, checked against one process holding the
full head on the concatenated global batch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from facemae.losses.margin import ArcFace, CosFace
from facemae.losses.partial_fc import (PartialFC, RowAdamW, class_range, data_parallel_embeddings, init_centres,
                                       load_shard, merge_shards, save_shard)

C, D, IN = 11, 8, 16  # 11 classes: 6 + 5 on two workers, 4 + 4 + 3 on three


def _entry(rank: int, world: int, init: str, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _batch(step: int, n: int, labels: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: ``n`` embeddings and their labels, the same in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    emb = torch.randn(n, D, generator=g)
    y = torch.tensor(labels) if labels is not None else torch.randint(0, C, (n,), generator=g)
    return emb, y


def _mine(rank: int, world: int, n: int) -> slice:
    per = n // world
    return slice(rank * per, (rank + 1) * per)


def _reference_head(margin: str, weight: torch.Tensor) -> torch.nn.Module:
    head = (ArcFace if margin == "arcface" else CosFace)(D, len(weight), s=64.0, m=0.5 if margin == "arcface" else 0.4)
    head.weight.data.copy_(weight)
    return head


def _exact(rank: int, world: int, margin: str, labels: list[int]) -> dict[str, Any]:
    """Ours and the full head's loss and gradients on one global batch."""
    m = 0.5 if margin == "arcface" else 0.4
    head = PartialFC(D, C, margin=margin, s=64.0, m=m, seed=3)
    emb, y = _batch(0, len(labels), labels)
    mine = _mine(rank, world, len(labels))
    local = emb[mine].clone().requires_grad_(True)
    out = head(local, y[mine])
    out["loss"].backward()
    ref_emb = emb.clone().requires_grad_(True)
    ref = _reference_head(margin, init_centres(0, C, D, seed=3))
    ref_loss = F.cross_entropy(ref(ref_emb, y), y)
    ref_loss.backward()
    return {"loss": out["loss"].detach(), "ref_loss": ref_loss.detach(), "accuracy": out["accuracy"],
            "ref_accuracy": (ref(ref_emb.detach()).argmax(1) == y).float().mean(),
            "weight_grad": head.weight.grad, "ref_weight_grad": ref.weight.grad[head.start:head.stop],
            "emb_grad": local.grad, "ref_emb_grad": ref_emb.grad[mine]}


def _dense(head: PartialFC) -> torch.Tensor:
    """The shard's gradient as a dense ``[rows, D]`` (taken: the head's pending gradient is cleared)."""
    rows, grad = head.take_gradient()
    dense = torch.zeros(head.num_local, D)
    dense[rows] = grad
    return dense


def _sampled(rank: int, world: int) -> dict[str, Any]:
    """Rate 0.4: ours against the full head restricted to the columns every shard scored, then one RowAdamW step."""
    head = PartialFC(D, C, sample_rate=0.4, seed=5)
    emb, y = _batch(1, 12, [0, 0, 2, 2, 10, 10, 5, 5, 2, 0, 10, 5])
    mine = _mine(rank, world, 12)
    local = emb[mine].clone().requires_grad_(True)
    out = head(local, y[mine], step=7)
    out["loss"].backward()
    index = head.sample(y, step=7)
    columns: list[Any] = [None] * world
    dist.all_gather_object(columns, (index + head.start).tolist())
    kept = torch.tensor(sorted(c for part in columns for c in part))
    ref_emb = emb.clone().requires_grad_(True)
    ref = _reference_head("arcface", init_centres(0, C, D, seed=5)[kept])
    y_kept = torch.searchsorted(kept, y)
    ref_loss = F.cross_entropy(ref(ref_emb, y_kept), y_kept)
    ref_loss.backward()
    ref_grad = torch.zeros(head.num_local, D)
    ref_grad[index] = ref.weight.grad[torch.searchsorted(kept, index + head.start)]
    result = {"index": index, "num_local": head.num_local, "start": head.start, "labels": y,
              "loss": out["loss"].detach(), "ref_loss": ref_loss.detach(), "weight_grad": _dense(head),
              "ref_weight_grad": ref_grad, "emb_grad": local.grad, "ref_emb_grad": ref_emb.grad[mine],
              "before": head.weight.detach().clone()}
    head(emb[mine], y[mine], step=7)["loss"].backward()  # the same step again, for the optimizer
    optimizer = RowAdamW(head, weight_decay=0.1)
    optimizer.step(lr=0.1)
    return {**result, "after": head.weight.detach().clone(), "exp_avg": optimizer.exp_avg.clone(),
            "steps": optimizer.steps.clone()}


def _backbone() -> torch.nn.Module:
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Linear(IN, 32), torch.nn.Tanh(), torch.nn.Linear(32, D))


def _backbone_optimizer(backbone: torch.nn.Module) -> torch.optim.Optimizer:
    # SGD, as arcface_torch's backbone: unlike Adam, it moves by the gradient's scale, which is what the
    # data-parallel correction (data_parallel_embeddings) gets right or wrong.
    return torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _inputs(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(77 + step)
    return torch.randn(n, IN, generator=g), torch.randint(0, C, (n,), generator=g)


class _Run:
    """A backbone trained data-parallel (gradients averaged, as DDP and DeepSpeed) with a sharded head."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.head = PartialFC(D, C, seed=9)
        self.optimizer = RowAdamW(self.head, weight_decay=0.05)
        self.backbone = _backbone()
        self.backbone_opt = _backbone_optimizer(self.backbone)

    def train(self, steps: range, *, n: int, clip: float) -> list[float]:
        losses = []
        for step in steps:
            x, y = _inputs(step, n)
            mine = _mine(self.rank, self.world, n)
            out = self.head(data_parallel_embeddings(self.backbone(x[mine]), self.world), y[mine], step=step)
            out["loss"].backward()
            for p in self.backbone.parameters():
                dist.all_reduce(p.grad)
                p.grad /= self.world
            self.backbone_opt.step()
            self.backbone_opt.zero_grad()
            self.optimizer.step(lr=0.01, clip=clip)
            losses.append(float(out["loss"]))
        return losses

    def save(self, folder: Path) -> torch.Tensor:
        """Shards and backbone into ``folder``; returns the whole head gathered from the workers."""
        folder.mkdir(parents=True, exist_ok=True)
        save_shard(self.head, self.optimizer, folder)
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, self.head.weight.detach().clone())
        if self.rank == 0:
            torch.save({"model": self.backbone.state_dict(), "optimizer": self.backbone_opt.state_dict()},
                       folder / "backbone.pt")
        dist.barrier()
        return torch.cat(gathered)

    def load(self, folder: Path) -> None:
        load_shard(self.head, self.optimizer, folder)
        state = torch.load(folder / "backbone.pt", weights_only=True)
        self.backbone.load_state_dict(state["model"])
        self.backbone_opt.load_state_dict(state["optimizer"])


def _reference_run(steps: int, *, n: int, clip: float) -> tuple[torch.nn.Module, torch.nn.Module, list[float]]:
    backbone, head = _backbone(), _reference_head("arcface", init_centres(0, C, D, seed=9))
    opt_b = _backbone_optimizer(backbone)
    opt_h = torch.optim.AdamW(head.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.05)
    losses = []
    for step in range(steps):
        x, y = _inputs(step, n)
        loss = F.cross_entropy(head(backbone(x), y), y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(head.parameters(), clip)
        opt_b.step(), opt_h.step(), opt_b.zero_grad(), opt_h.zero_grad()
        losses.append(float(loss))
    return backbone, head, losses


EXACT_LABELS = {"ends": [0, 10, 3, 3, 7, 1, 10, 5, 0, 2, 9, 4]}  # labels 0 and C-1


def _worker(rank: int, world: int, out: str, resume: str) -> None:
    """Everything the tests compare, computed on one process group of ``world`` workers and saved per rank."""
    result: dict[str, Any] = {"range": (PartialFC(D, C).start, PartialFC(D, C).stop)}
    last = class_range(C, world, world - 1)[0]
    for margin in ("arcface", "cosface"):
        for name, labels in {**EXACT_LABELS, "last_shard_empty": [i % last for i in range(12)]}.items():
            result[f"exact/{margin}/{name}"] = _exact(rank, world, margin, labels)
    result["sampled"] = _sampled(rank, world)
    # 20 steps, the head clipped at 0.5 over all its shards (the reference clips its full head alone).
    run = _Run(rank, world)
    losses = run.train(range(20), n=4 * world, clip=0.5)
    ref_backbone, ref_head, ref_losses = _reference_run(20, n=4 * world, clip=0.5)
    result["twenty"] = {"losses": losses, "ref_losses": ref_losses, "head": run.head.weight.detach().clone(),
                        "ref_head": ref_head.weight.detach()[run.head.start:run.head.stop],
                        "backbone": [p.detach().clone() for p in run.backbone.parameters()],
                        "ref_backbone": [p.detach().clone() for p in ref_backbone.parameters()]}
    # Resume: 6 steps, a checkpoint, 6 more (three workers write the checkpoint, two resume from it).
    run = _Run(rank, world)
    if world == 3:
        run.train(range(0, 6), n=12, clip=0.0)
        run.save(Path(resume))
    else:
        run.load(Path(resume))
    result["resumed"] = {"losses": run.train(range(6, 12), n=12, clip=0.0),
                         "weights": run.save(Path(out) / "checkpoint"), "folder": Path(out) / "checkpoint"}
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict[str, Any]]]:
    """Per world size (3, then 2: the two resume from the three's checkpoint), each rank's results."""
    root = tmp_path_factory.mktemp("partial_fc")
    results = {}
    for world in (3, 2):
        out = root / f"world{world}"
        out.mkdir()
        mp.spawn(_entry, args=(world, str(root / f"init{world}"), _worker, (str(out), str(root / "resume"))),
                 nprocs=world, join=True)
        results[world] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return results


def _close(a: Any, b: Any, **tolerance: float) -> None:
    torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("margin", ["arcface", "cosface"])
@pytest.mark.parametrize("labels", ["ends", "last_shard_empty"])
def test_sharded_loss_and_gradients_equal_the_full_head(runs, world, margin, labels):
    ranks = runs[world]
    assert [r["range"] for r in ranks] == [class_range(C, world, k) for k in range(world)]
    if labels == "last_shard_empty":
        assert not ranks[-1][f"exact/{margin}/{labels}"]["weight_grad"].abs().sum() == 0  # negatives still learn
    for rank in ranks:
        got = rank[f"exact/{margin}/{labels}"]
        _close(got["loss"], got["ref_loss"], rtol=1e-5, atol=1e-6)
        _close(got["weight_grad"], got["ref_weight_grad"], rtol=1e-4, atol=1e-7)
        _close(got["emb_grad"], got["ref_emb_grad"], rtol=1e-4, atol=1e-7)
        assert float(got["accuracy"]) == pytest.approx(float(got["ref_accuracy"]))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sampled_negatives_keep_every_positive_and_equal_the_full_head_on_those_columns(runs, world):
    for rank in runs[world]:
        got = rank["sampled"]
        index, start = got["index"], got["start"]
        positives = {int(c) - start for c in got["labels"] if start <= c < start + got["num_local"]}
        assert positives <= set(index.tolist())
        assert len(index) == max(math.ceil(0.4 * got["num_local"]), len(positives)) < got["num_local"]
        _close(got["loss"], got["ref_loss"], rtol=1e-5, atol=1e-6)
        _close(got["weight_grad"], got["ref_weight_grad"], rtol=1e-4, atol=1e-7)  # unsampled rows: none
        _close(got["emb_grad"], got["ref_emb_grad"], rtol=1e-4, atol=1e-7)
        # The optimizer moved the sampled rows only: weights, moments and step counts of the others stay.
        unsampled = torch.ones(got["num_local"], dtype=torch.bool)
        unsampled[index] = False
        assert torch.equal(got["after"][unsampled], got["before"][unsampled])
        assert not torch.equal(got["after"][index], got["before"][index])
        assert got["exp_avg"][unsampled].abs().sum() == 0 and got["steps"][unsampled].sum() == 0
        assert torch.all(got["steps"][index] == 1)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_twenty_sharded_steps_end_at_the_full_heads_weights(runs, world):
    for rank in runs[world]:
        got = rank["twenty"]
        assert got["losses"] == pytest.approx(got["ref_losses"], rel=1e-4)
        assert got["losses"][-1] < got["losses"][0]
        _close(got["head"], got["ref_head"], rtol=1e-4, atol=1e-5)
        for ours, theirs in zip(got["backbone"], got["ref_backbone"]):  # SGD at lr 0.1: float drift of ~6e-5
            _close(ours, theirs, rtol=1e-3, atol=2e-4)


@pytest.mark.slow
def test_a_three_worker_checkpoint_resumes_on_two_workers_on_the_same_loss_curve(runs):
    three, two = runs[3][0]["resumed"], runs[2][0]["resumed"]
    assert two["losses"] == pytest.approx(three["losses"], rel=1e-5)
    _close(two["weights"], three["weights"], rtol=1e-5, atol=1e-6)
    # The export's merge is the concatenated shards, whichever number of workers wrote them.
    _close(merge_shards(three["folder"]), three["weights"], rtol=0, atol=0)
    _close(merge_shards(two["folder"]), two["weights"], rtol=0, atol=0)
    assert len(list(two["folder"].glob("head_shard_rank*.pt"))) == 2


def test_a_missing_shard_is_named(tmp_path):
    for rank, (start, stop) in enumerate([(0, 4), (4, 8), (8, 11)]):
        if rank != 1:
            torch.save({"start": start, "stop": stop, "num_classes": 11, "embedding_size": D, "world_size": 3,
                        "weight": torch.zeros(stop - start, D)}, tmp_path / f"head_shard_rank{rank:03d}.pt")
    with pytest.raises(ValueError, match=r"head_shard_rank002.pt covers classes \[8, 11\) where \[4, ...\)"):
        merge_shards(tmp_path)
    with pytest.raises(ValueError, match="holds no Partial FC shards"):
        merge_shards(tmp_path / "nothing")


def test_class_ranges_tile_the_classes_unevenly():
    for classes, world in [(11, 3), (10, 4), (7, 7), (1_000_003, 8)]:
        ranges = [class_range(classes, world, r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_centres_do_not_depend_on_the_sharding():
    full = init_centres(0, 9000, 4, seed=2)
    parts = [init_centres(*class_range(9000, 3, r), 4, seed=2) for r in range(3)]
    assert torch.equal(torch.cat(parts), full)
    assert full.std().item() == pytest.approx(0.01, rel=0.05)


def _deepspeed_pair(rank: int, world: int, out: str) -> None:
    """The platform's FR task in real DeepSpeed engines, sharded head vs full head, the same data and start."""
    import os

    from facemae.config import load_config
    from facemae.train import engine as ds
    from facemae.train.tasks import build_task

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    common = ["train.task=fr", "model.fr=fr_tiny", "model.embedding_size=64", "train.micro_batch=4",
              "train.zero_stage=0", "train.grad_clip=0", "train.base_lr=0.05", "train.warmup_steps=1",
              "train.max_steps=6"]
    tasks, engines = {}, {}
    for head in ("full", "partial_fc"):
        config = load_config(None, [*common, f"model.head={head}"])
        torch.manual_seed(0)  # the same backbone in both
        tasks[head] = build_task(config, num_classes=C, device=torch.device("cpu"))
        engines[head] = ds.build_engine(tasks[head], config.train, world_size=world)
    shard = tasks["partial_fc"].head
    with torch.no_grad():  # the same class centres
        shard.weight.copy_(tasks["full"].head.weight[shard.start:shard.stop])
    losses: dict[str, list[float]] = {"full": [], "partial_fc": []}
    grads: dict[str, list[torch.Tensor]] = {}
    for step in range(6):
        g = torch.Generator().manual_seed(step * 10 + rank)
        batch = {"image": torch.randn(4, 3, 112, 112, generator=g), "identity": torch.randint(0, C, (4,), generator=g)}
        for head, engine in engines.items():
            tasks[head].step = step
            result = engine(batch)
            lr, scale = engine.get_lr()[0], ds.loss_scale(engine)
            engine.backward(result["loss"])  # ZeRO 0: the gradients are averaged over the workers here
            if step == 0:
                grads[head] = [p.grad.detach().clone() for p in tasks[head].backbone.parameters() if p.ndim > 1]
            engine.step()
            tasks[head].step_head(lr=lr, loss_scale=scale, applied=engine.was_step_applied())
            loss = result["loss"].detach().clone()
            if head == "full":  # each worker's own batch: the global batch's mean is their average
                dist.all_reduce(loss)
                loss /= world
            losses[head].append(float(loss))
    probe = torch.randn(8, 3, 112, 112, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():  # train mode: batch statistics, where a bias just before a BatchNorm cancels
        embedded = {head: task.backbone.train()(probe) for head, task in tasks.items()}
    torch.save({"losses": losses, "range": (shard.start, shard.stop), "embedded": embedded, "grads": grads,
                "full_head": tasks["full"].head.weight.detach().clone(), "shard": shard.weight.detach().clone(),
                "full_backbone": [p.detach().clone() for p in tasks["full"].backbone.parameters() if p.ndim > 1],
                "backbone": [p.detach().clone() for p in tasks["partial_fc"].backbone.parameters() if p.ndim > 1]},
               Path(out) / f"ds{rank}.pt")


@pytest.mark.slow
def test_in_deepspeed_engines_the_sharded_head_trains_as_the_full_head(tmp_path):
    # ZeRO 0 on two workers: DeepSpeed averages the backbone's gradients and steps the full head inside the engine;
    # the shards step outside it. Six steps from the same start on the same batches end at the same weights.
    mp.spawn(_entry, args=(2, str(tmp_path / "init"), _deepspeed_pair, (str(tmp_path),)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"ds{rank}.pt", weights_only=False)
        assert got["losses"]["partial_fc"] == pytest.approx(got["losses"]["full"], rel=1e-4)
        start, stop = got["range"]
        torch.testing.assert_close(got["shard"], got["full_head"][start:stop], rtol=1e-4, atol=1e-5)
        for ours, theirs in zip(got["grads"]["partial_fc"], got["grads"]["full"]):  # the first step's, averaged
            torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)
        # Convolution and FC weights, and what the backbone computes. (A bias just before a BatchNorm has no
        # gradient but rounding noise, which Adam turns into steps of about lr: those differ, and cancel.)
        for ours, theirs in zip(got["backbone"], got["full_backbone"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(got["embedded"]["partial_fc"], got["embedded"]["full"], rtol=1e-3, atol=1e-3)
