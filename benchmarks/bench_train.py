"""Training throughput of the smoke-sized FaceMAE on Ray Train + DeepSpeed, per ZeRO stage.

Each stage trains the same tiny FaceMAE (IRM with stored teacher embeddings) on 2 CPU workers for
``--steps`` steps; steps/s is measured between the first and the last logged step (worker start-up
and DeepSpeed initialisation excluded), and every figure is also given as a ratio to ZeRO-0 of the
same run. Also prints the data-wait fraction (share of each worker's time spent waiting for Ray Data).

    python benchmarks/bench_train.py [--steps 40] [--micro-batch 16] [--stages 0 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from facemae.config import load_config
from facemae.data.ingest import ingest
from facemae.generate.embed import embed_dataset
from facemae.models.registry import build_fr
from facemae.models.weights import save_weights
from facemae.train.trainer import train

TINY = ["model.mae=facemae_vit_tiny_p8", "model.teacher=fr_tiny", "model.embedding_size=64",
        "train.metrics_port=0", "train.base_lr=0.016", "train.warmup_steps=2", "ray.num_cpus=2"]


def _run(work: Path, dataset: str, teacher: str, stage: int, args: argparse.Namespace) -> dict[str, float]:
    config = load_config(None, [*TINY, f"data.output={dataset}", f"train.teacher={teacher}",
                                f"train.storage_path={work / 'runs'}", f"name=zero{stage}",
                                f"train.zero_stage={stage}", f"train.max_steps={args.steps}",
                                f"train.micro_batch={args.micro_batch}", "train.log_every=5",
                                f"train.checkpoint_every={args.steps}"])
    result = train(config, dataset=dataset)
    lines = [json.loads(x) for x in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    steps_per_s = (last["step"] - first["step"]) / (last["time"] - first["time"])
    return {"steps_per_s": steps_per_s, "images_per_s": steps_per_s * config.train.global_batch(2),
            "data_wait": statistics.median(x["data_wait_fraction"] for x in lines),
            "recon_loss": last["recon_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = load_config(None, [*TINY, f"data.output={work / 'ds'}", "data.num_identities=40",
                                    "data.images_per_identity=10", "data.workers=1"])
        ingest(config)
        torch.manual_seed(0)
        teacher = str(save_weights(build_fr("fr_tiny", embedding_size=64), work / "teacher",
                                   {"task": "fr", "model": "fr_tiny", "embedding_size": 64}))
        dataset = str(work / "ds-emb")
        embed_dataset(config, source=str(work / "ds"), weights=teacher, output=dataset)
        results = {stage: _run(work, dataset, teacher, stage, args) for stage in args.stages}
    base = results[args.stages[0]]
    print(f"\n{'ZeRO':>5} {'steps/s':>8} {'images/s':>9} {'vs ZeRO-' + str(args.stages[0]):>10} "
          f"{'data wait':>10} {'recon loss':>11}")
    for stage, r in results.items():
        print(f"{stage:>5} {r['steps_per_s']:8.2f} {r['images_per_s']:9.1f} "
              f"{r['steps_per_s'] / base['steps_per_s']:10.2f} {r['data_wait']:10.3f} {r['recon_loss']:11.4f}")


if __name__ == "__main__":
    main()
