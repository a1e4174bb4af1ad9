"""Partial FC against the replicated full margin head: per-worker memory and step time (issue 29 item 5).

For each number of identities C (embedding 512, global batch ``--batch`` split over ``--workers`` CPU gloo
processes, one thread each) three heads train a few steps:

- ``full``: :class:`facemae.losses.margin.ArcFace` with all C classes on every worker, as the platform trains
  it today (``facemae.train.steps.fr_step``: the local batch's cross-entropy, plus the accuracy forward),
  its gradient all-reduced and averaged as the data-parallel engine does (DDP, DeepSpeed ZeRO-0), then
  ``torch.optim.AdamW``;
- ``partial_fc`` at sample rate 1.0 and 0.1: :class:`facemae.losses.partial_fc.PartialFC` (C / workers
  classes per worker, the global batch's loss) and :class:`~facemae.losses.partial_fc.RowAdamW`.

Only the head runs: the embeddings are random leaf tensors with ``requires_grad``, so a step is the head's
forward, backward and optimizer step. Every (C, head) row runs in freshly spawned processes, because the peak
resident set (``getrusage``'s ``ru_maxrss``) only ever grows in a process. Each worker first builds and steps
a 256-class head of the same kind (gloo buffers, kernels and autograd threads come up), then takes its
baseline RSS; the head's peak is ``ru_maxrss`` at the end less that baseline: weights, optimizer state,
gradient, logits and every step temporary (normalised centre copies, backward and AdamW intermediates,
allocator slack), as the operating system saw them. ``baseline_slack_mib`` is how far ``ru_maxrss`` already
stood above the baseline (import-time transients): a head peak below that would be overstated by up to it.
Beside it, the analytic figure: fp32 weight and two Adam moments of the rows a worker holds, the gradient
(dense over the full head and over a rate-1.0 shard; only the sampled rows' at rate < 1, which backward leaves
on a leaf of their own), RowAdamW's int64 step count per row, plus one fp32 logits matrix ([local batch, C] for ``full``, [global batch, sampled classes] for
Partial FC). Step time: each worker's median over ``--steps`` steps after ``--warmup``, workers aligned by a
barrier before each step; the row's figure is the slowest worker's.

    python benchmarks/partial_fc.py                              # 10k, 100k and 1M identities
    python benchmarks/partial_fc.py --identities 10000 100000

At 100k the full head peaked near 9.5 weight-sized tensors per worker, so its 1M row needs ~19 GiB per worker
(~40 GiB for two; rows run one after another): run 1M on a machine with 48 GiB or more.

Writes ``benchmarks/results/partial_fc.{json,md}``. Rows of sizes not run this time are kept from the existing
JSON (merged by identities, head and sample rate, each row with its own provenance).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from facemae.losses.margin import ArcFace
from facemae.losses.partial_fc import PartialFC, RowAdamW
from provenance import RESULTS, provenance

EMBEDDING = 512
HEADS = [("full", 1.0), ("partial_fc", 1.0), ("partial_fc", 0.1)]
LR, BETAS, WEIGHT_DECAY = 1e-3, (0.9, 0.95), 0.05  # the platform's AdamW betas
GOALS = {"mem_rate1": 0.55, "mem_rate01": 0.15, "speedup_1m": 5.0}
Step = Callable[[torch.Tensor, torch.Tensor, int], float]


def make_step(head: str, rate: float, classes: int, *, world: int) -> Step:
    """One training step of the head on ``(embeddings, labels, step)``; returns its gradient all-reduce's seconds."""
    if head == "full":
        arc = ArcFace(EMBEDDING, classes)
        opt = torch.optim.AdamW(arc.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)

        def full(emb: torch.Tensor, labels: torch.Tensor, step: int) -> float:
            loss = F.cross_entropy(arc(emb, labels), labels)  # as fr_step: (n, C) logits of the local batch
            with torch.no_grad():
                (arc(emb).argmax(dim=1) == labels).float().mean()  # fr_step's accuracy
            loss.backward()
            started = time.perf_counter()
            dist.all_reduce(arc.weight.grad)  # the data-parallel engine averages every gradient, the head's too
            arc.weight.grad /= world
            reduce_s = time.perf_counter() - started
            opt.step()
            opt.zero_grad()
            return reduce_s
        return full
    pfc = PartialFC(EMBEDDING, classes, sample_rate=rate)
    row_opt = RowAdamW(pfc, betas=BETAS, weight_decay=WEIGHT_DECAY)

    def partial(emb: torch.Tensor, labels: torch.Tensor, step: int) -> float:
        pfc(emb, labels, step=step)["loss"].backward()
        row_opt.step(lr=LR)
        return 0.0
    return partial


def analytic_mib(head: str, rate: float, classes: int, *, world: int, batch: int) -> float:
    """Weight + two Adam moments (fp32) of a worker's rows, the gradient of the rows a step scores, and one fp32
    logits matrix."""
    if head == "full":
        rows, cols, n, steps = classes, classes, batch // world, 0
    else:
        rows = -(-classes // world)  # the largest shard
        cols, n, steps = math.ceil(rate * rows), batch, 8 * rows  # RowAdamW: an int64 step count per row
    return ((3 * rows + cols) * EMBEDDING * 4 + n * cols * 4 + steps) / 2**20


def _worker(rank: int, world: int, init: str, spec: dict[str, Any], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        local = spec["batch"] // world

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(step * 1000 + rank)
            return (torch.randn(local, EMBEDDING, generator=g).requires_grad_(True),
                    torch.randint(0, spec["identities"], (local,), generator=g))

        warm = make_step(spec["head"], spec["sample_rate"], 256, world=world)
        for step in range(2):
            emb, _ = batch(step)
            warm(emb, torch.randint(0, 256, (local,)), step)
        del warm
        dist.barrier()
        baseline = psutil.Process().memory_info().rss
        slack = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # Linux: KiB
        step_fn = make_step(spec["head"], spec["sample_rate"], spec["identities"], world=world)
        times, reduces = [], []
        for step in range(spec["warmup"] + spec["steps"]):
            emb, labels = batch(step)
            dist.barrier()
            started = time.perf_counter()
            reduce_s = step_fn(emb, labels, step)
            if step >= spec["warmup"]:
                times.append(time.perf_counter() - started)
                reduces.append(reduce_s)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "peak_mib": peak / 2**20, "slack_mib": max(0, slack) / 2**20, "baseline_mib": baseline / 2**20,
            "step_s": statistics.median(times), "allreduce_s": statistics.median(reduces)}))
    finally:
        dist.destroy_process_group()


def run_row(identities: int, head: str, rate: float, args: argparse.Namespace, meta: dict[str, str]) -> dict:
    """One row, measured on ``args.workers`` freshly spawned processes."""
    spec = {"identities": identities, "head": head, "sample_rate": rate, "batch": args.batch,
            "warmup": args.warmup, "steps": args.steps}
    load = os.getloadavg()[0]  # the machine's load as the row starts: times on a busy machine run long
    with tempfile.TemporaryDirectory(prefix="facemae-partial-fc-") as tmp:
        mp.spawn(_worker, args=(args.workers, str(Path(tmp) / "init"), spec, tmp), nprocs=args.workers, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.workers)]
    return {"identities": identities, "head": head, "sample_rate": rate, "workers": args.workers,
            "batch": args.batch, "embedding": EMBEDDING, "steps": args.steps,
            "head_peak_mib_per_worker": round(max(r["peak_mib"] for r in ranks), 1),
            "analytic_mib_per_worker": round(analytic_mib(head, rate, identities, world=args.workers,
                                                          batch=args.batch), 1),
            "step_s": round(max(r["step_s"] for r in ranks), 4),
            "grad_allreduce_s": round(max(r["allreduce_s"] for r in ranks), 4),
            "baseline_rss_mib": round(max(r["baseline_mib"] for r in ranks), 1),
            "baseline_slack_mib": round(max(r["slack_mib"] for r in ranks), 1), "load_average_1m": load,
            "per_worker": [{k: round(v, 4) for k, v in r.items()} for r in ranks], "provenance": meta}


def _key(row: dict) -> tuple[int, int, float]:
    return row["identities"], [h for h, _ in HEADS].index(row["head"]), -row["sample_rate"]


def summary(rows: list[dict]) -> list[str]:
    """Ratios per identities, each against its goal."""
    def verdict(ok: bool) -> str:
        return "pass" if ok else "FAIL"
    lines = []
    for c in sorted({r["identities"] for r in rows}):
        got = {(r["head"], r["sample_rate"]): r for r in rows if r["identities"] == c}
        full, one, tenth = got.get(("full", 1.0)), got.get(("partial_fc", 1.0)), got.get(("partial_fc", 0.1))
        if full is None:
            continue
        mem = "head_peak_mib_per_worker"
        parts = []
        if one:
            ratio = one[mem] / full[mem]
            parts.append(f"partial_fc@1.0 / full memory {ratio:.2f}x (goal <= {GOALS['mem_rate1']}: "
                         f"{verdict(ratio <= GOALS['mem_rate1'])})")
        if tenth:
            ratio, speed = tenth[mem] / full[mem], full["step_s"] / tenth["step_s"]
            parts.append(f"partial_fc@0.1 / full memory {ratio:.2f}x (goal <= {GOALS['mem_rate01']}: "
                         f"{verdict(ratio <= GOALS['mem_rate01'])})")
            goal = (f"goal >= {GOALS['speedup_1m']}x: {verdict(speed >= GOALS['speedup_1m'])}"
                    if c == 1_000_000 else "the goal is at 1M")
            parts.append(f"full / partial_fc@0.1 step time {speed:.2f}x ({goal})")
        lines.append(f"- {c:,} identities: " + "; ".join(parts) + ".")
    if not any(r["identities"] == 1_000_000 for r in rows):
        lines.append(f"- 1,000,000 identities: not measured yet (step goal >= {GOALS['speedup_1m']}x open).")
    return lines


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = ["# Partial FC vs the replicated full head: memory and step time per worker", "",
             f"{result['date']} · {result['machine']} · commit {result['commit']} · `{result['command']}`", "",
             f"Embedding {EMBEDDING}, global batch {rows[0]['batch']} over {rows[0]['workers']} CPU gloo workers "
             "(one thread each), head only (random embeddings). Memory: peak RSS increase of a fresh worker over "
             "its baseline (after imports, the process group and a 256-class warm-up); analytic: fp32 weight + "
             "Adam moments of the worker's rows + the gradient of the rows a step scores + one logits matrix. Step: forward + backward "
             "(+ the full head's gradient all-reduce) + optimizer step, median, slowest worker. Slack: how far the "
             "peak RSS already stood above the baseline (a head peak below it is overstated by up to it); load: the "
             "machine's 1-minute load average as the row started.", "",
             "| identities | head | rate | peak MiB/worker | analytic MiB | step s | of which all-reduce s "
             "| slack MiB | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['identities']:,} | {r['head']} | {r['sample_rate']} | {r['head_peak_mib_per_worker']:.1f} | "
              f"{r['analytic_mib_per_worker']:.1f} | {r['step_s']:.4f} | {r['grad_allreduce_s']:.4f} | "
              f"{r['baseline_slack_mib']:.1f} | {r['load_average_1m']:.1f} |" for r in rows]
    lines += ["", "Reading it: per worker, Partial FC's logits are [global batch, C / workers], the full head's "
              "[local batch, C]: the same bytes, so the logits and their step temporaries do not shrink with "
              "sharding; only the weight-sized tensors do. Whatever the sample rate, a shard keeps its fp32 "
              "weight, a gradient dense over the shard and both Adam moments: 4 x C / workers x D x 4 bytes, "
              "the floor of the rate-0.1 row. Below ~32 MiB a tensor comes from glibc's heap, which keeps freed "
              "pages, so the small rows' peaks carry allocator slack and vary by ~10% between runs.",
              "", "Ratios and goals:", "", *summary(rows)]
    older = {json.dumps(r["provenance"], sort_keys=True) for r in rows} - {json.dumps(
        {k: result[k] for k in ("date", "machine", "commit", "command")}, sort_keys=True)}
    for run in sorted(older):
        meta = json.loads(run)
        sizes = sorted({r["identities"] for r in rows if r["provenance"] == meta})
        lines.append(f"\nRows of {', '.join(f'{c:,}' for c in sizes)} identities kept from an earlier run: "
                     f"{meta['date']} · {meta['machine']} · commit {meta['commit']} · `{meta['command']}`.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=2, help="CPU gloo processes")
    parser.add_argument("--batch", type=int, default=128, help="global batch, split evenly over the workers")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--out", default=str(RESULTS / "partial_fc"), help="results stem: writes .json and .md")
    args = parser.parse_args()
    if args.batch % args.workers:
        raise ValueError(f"global batch {args.batch} is not divisible by {args.workers} workers")
    meta = provenance()
    out = Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").exists() else []
    new = []
    for identities in args.identities:
        for head, rate in HEADS:
            new.append(run_row(identities, head, rate, args, meta))
            print(json.dumps({k: v for k, v in new[-1].items() if k not in ("per_worker", "provenance")}), flush=True)
    fresh = {_key(r) for r in new}
    rows = sorted([r for r in old if _key(r) not in fresh] + new, key=_key)
    result = {**meta, "goals": GOALS, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
