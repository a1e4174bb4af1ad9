"""CPU step time of the tiny models: FaceMAE + IRM, plain MAE (the baseline) and FR with ArcFace.

A step is forward, backward and an AdamW / SGD update on one batch of random faces. Each variant runs
``--steps`` steps ``--repeats`` times after a warm-up; the median step time is reported, next to the
plain-MAE baseline measured in the same run, so the IRM overhead ratio is comparable across machines.
"stored emb" is FaceMAE + IRM with the originals' teacher embeddings taken from the batch.

    python benchmarks/bench_models.py [--mae facemae_vit_tiny_p8] [--batch 8] [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from facemae.config import Config, load_config
from facemae.losses.margin import build_head
from facemae.models.registry import MAE_SPECS, build_fr, build_mae
from facemae.train.steps import fr_step, mae_irm_step
from facemae.train.tasks import FP32Teacher
from figures import median_seconds  # a sibling script: benchmarks/ is on sys.path when run


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _median_step(step: Callable[[], None], *, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per step of ``steps`` calls, after two warm-up steps."""
    return median_seconds(step, repeats=repeats, inner=steps)


def _mae_step(config: Config, *, batch: int, stored_emb: bool = False) -> tuple[Callable[[], None], int]:
    model = build_mae(config.model.mae)
    teacher = FP32Teacher(build_fr(config.model.teacher, embedding_size=config.model.embedding_size))  # as trained
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = {"image": torch.randn(batch, 3, 112, 112), "identity": torch.arange(batch)}
    if stored_emb:  # as shards written at ingestion carry them: one teacher pass per step instead of two
        with torch.no_grad():
            data["teacher_emb"] = teacher(data["image"])
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = mae_irm_step(model, teacher, data, config, generator=generator)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, _params(model)


def _fr_step(config: Config, *, batch: int, classes: int) -> tuple[Callable[[], None], int]:
    backbone = build_fr(config.model.fr, embedding_size=config.model.embedding_size)
    head = build_head(config.loss.margin, config.model.embedding_size, classes, s=config.loss.s,
                      m=config.loss.margin_m)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    data = {"image": torch.randn(batch, 3, 112, 112), "identity": torch.arange(batch) % classes}

    def step() -> None:
        loss = fr_step(backbone, head, data, config)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, _params(backbone) + _params(head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mae", default="facemae_vit_tiny_p8", choices=list(MAE_SPECS))
    parser.add_argument("--fr", default="fr_tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    # One thread by default: on a small shared box two OpenMP threads can stall each other (10x+).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    patch = MAE_SPECS[args.mae].patch_size
    base = [f"mask.patch_size={patch}", f"model.mae={args.mae}", f"model.teacher={args.fr}", f"model.fr={args.fr}"]
    runs = {
        "MAE (baseline)": _mae_step(load_config(None, [*base, "loss.lambda_irm=0"]), batch=args.batch),
        "FaceMAE + IRM": _mae_step(load_config(None, base), batch=args.batch),
        "  stored emb": _mae_step(load_config(None, base), batch=args.batch, stored_emb=True),
        "FR + ArcFace": _fr_step(load_config(None, base), batch=args.batch, classes=args.batch),
    }
    times = {name: _median_step(step, steps=args.steps, repeats=args.repeats) for name, (step, _) in runs.items()}
    print(f"{args.mae} / {args.fr}, batch {args.batch}, {args.threads} thread(s), median of {args.repeats} x "
          f"{args.steps} steps (forward + backward + update)")
    baseline = times["MAE (baseline)"]
    for name, (_, params) in runs.items():
        print(f"{name:16s} {params / 1e6:7.3f} M params  {times[name] * 1e3:8.1f} ms/step  "
              f"{times[name] / baseline:5.2f} x baseline")
    print(f"teacher ({args.fr}) {_params(build_fr(args.fr)) / 1e6:.3f} M params, frozen")


if __name__ == "__main__":
    main()
