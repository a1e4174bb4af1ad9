"""Load: ingest, mask and release N synthetic faces on the embedded Ray cluster, with bounded memory.

For each size (default 10,000, 50,000 and 100,000) one fresh process runs the owner's side and the release
end to end: synthetic ingest (all faces), owner-side masking of every split, then generation through
the Ray Data actor pool with a FaceMAE (``facemae_vit_tiny_p8``, freshly initialised: the load is the
same as a trained one's). This process samples the memory of that process and of its whole tree (the
embedded Ray: GCS, raylet, workers, actors) every 0.5 s, as RSS and as PSS. Memory must stay flat in N: the
driver streams shards and never holds a dataset, and the embedded cluster's object store is bounded
(``ray.object_store_mib``), so past the size that first fills the store the peaks must not grow. After each stage
the child also records what Ray's memory summary says the store holds (``store`` in each run).

    python benchmarks/load.py                                    # 10k, 50k and 100k, ~35 min on 2 cores
    python benchmarks/load.py --sizes 2000 10000                 # quicker
    python benchmarks/load.py --set ray.object_store_mib=4096    # any config override, in every run

Writes ``benchmarks/results/load.json`` and ``load.md`` (date, machine, commit, command), or
``<name>.{json,md}`` with ``--name`` (a control run beside the figures).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from provenance import RESULTS, provenance

PER_IDENTITY = 20
SAMPLE_S = 0.5


def run_one(size: int, root: Path, overrides: list[str]) -> dict[str, dict]:
    """The stages for ``size`` faces in this process; returns ``seconds`` per stage and the object ``store``
    after each (its capacity and Ray's memory summary's plasma line, MiB)."""
    import ray

    from facemae.config import load_config
    from facemae.data.ingest import ingest
    from facemae.data.owner import mask_dataset
    from facemae.generate.release import generate_released
    from facemae.models.registry import build_mae
    from facemae.models.weights import save_weights

    weights = save_weights(build_mae("facemae_vit_tiny_p8", norm_pix_loss=False), root / "weights",
                           {"task": "mae", "model": "facemae_vit_tiny_p8", "embedding_size": 128,
                            "norm_pix_loss": False})
    config = load_config("jobs/configs/train.yaml", [
        f"data.output={root / 'faces'}", f"data.num_identities={size // PER_IDENTITY}",
        f"data.images_per_identity={PER_IDENTITY}", "data.rows_per_shard=500", "data.workers=2",
        "mask.splits=[train, val, deploy]", f"generate.weights={weights}", f"generate.output={root / 'released'}",
        *overrides])
    seconds, store = {}, {}
    for stage, work in (("ingest", lambda: ingest(config)), ("mask", lambda: mask_dataset(config)),
                        ("release", lambda: generate_released(config))):
        started = time.perf_counter()
        manifest = work()
        seconds[stage] = time.perf_counter() - started
        assert manifest.num_images() == size, (stage, manifest.num_images(), size)
        store[stage] = _store_summary(ray)
    return {"seconds": seconds, "store": store}


def _store_summary(ray) -> dict[str, float | str]:
    """The embedded cluster's object store: capacity (MiB) and the plasma usage line of Ray's memory summary."""
    from ray._private.internal_api import memory_summary

    lines = memory_summary(stats_only=True).splitlines()
    return {"capacity_mib": round(ray.cluster_resources().get("object_store_memory", 0) / 2**20),
            "summary": next((line.strip() for line in lines if "Plasma memory usage" in line), "")}


def _tree_memory(proc: psutil.Process) -> dict[str, int]:
    """Bytes: ``driver`` (RSS of proc), ``tree`` (RSS summed over proc and every descendant) and
    ``tree_pss`` (PSS summed: shared pages, the Ray object store's among them, split among the processes
    that map them, so they count once rather than once per process)."""
    out = {"driver": 0, "tree": 0, "tree_pss": 0}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:  # gone between listing and reading
            continue
        out["driver"] = info.rss if p.pid == proc.pid else out["driver"]
        out["tree"] += info.rss
        out["tree_pss"] += info.pss
    return out


def measure(size: int, overrides: list[str]) -> dict[str, float]:
    """Runs :func:`run_one` in a child process while sampling its memory."""
    with tempfile.TemporaryDirectory(prefix="facemae-load-") as tmp:
        out = Path(tmp) / "seconds.json"
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, __file__, "--one", str(size), "--root", tmp, "--out", str(out),
                                  *(f"--set={o}" for o in overrides)],
                                 stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "child.log", "w"))
        proc, peak = psutil.Process(child.pid), {"driver": 0, "tree": 0, "tree_pss": 0}
        while child.poll() is None:
            peak = {k: max(v, now) for (k, v), now in zip(peak.items(), _tree_memory(proc).values())}
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - started
        if child.returncode != 0:
            raise RuntimeError(f"load run of {size} faces failed:\n{(Path(tmp) / 'child.log').read_text()[-3000:]}")
        seconds, store = json.loads(out.read_text()).values()
    return {"faces": size, "wall_s": round(wall, 1), **{f"{k}_s": round(v, 1) for k, v in seconds.items()},
            "release_images_per_s": round(size / seconds["release"], 1),
            "images_per_s": round(size / sum(seconds.values()), 1),
            "peak_driver_rss_mib": round(peak["driver"] / 2**20), "peak_tree_rss_mib": round(peak["tree"] / 2**20),
            "peak_tree_pss_mib": round(peak["tree_pss"] / 2**20), "store": store}


def _growth(small: dict, large: dict) -> dict[str, float]:
    """The larger run's peaks and rate over the smaller's."""
    ratio = {"driver_rss": "peak_driver_rss_mib", "tree_rss": "peak_tree_rss_mib", "tree_pss": "peak_tree_pss_mib",
             "images_per_s": "images_per_s"}
    return {"from": small["faces"], "to": large["faces"],
            **{k: round(large[v] / small[v], 3) for k, v in ratio.items()}}


def _markdown(result: dict) -> str:
    rows = result["runs"]
    keys = ["faces", "wall_s", "ingest_s", "mask_s", "release_s", "release_images_per_s", "images_per_s",
            "peak_driver_rss_mib", "peak_tree_rss_mib", "peak_tree_pss_mib"]
    lines = [f"# Load: {' and '.join(str(r['faces']) for r in rows)} synthetic faces ingested, masked and released",
             "", f"{result['date']} · {result['machine']} · commit {result['commit']} · `{result['command']}`", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    lines += ["", "Growth from each size to the next (goal from 50k to 100k: driver RSS <= 1.10x, tree PSS <= 1.15x, "
              "end-to-end rate not lower):", "", "| faces | driver RSS | tree RSS | tree PSS | images/s |",
              "|---|---|---|---|---|"]
    lines += [f"| {g['from']} -> {g['to']} | {g['driver_rss']:.2f}x | {g['tree_rss']:.2f}x | {g['tree_pss']:.2f}x | "
              f"{g['images_per_s']:.2f}x |" for g in result["growth"]]
    capacity = {s["capacity_mib"] for r in rows for s in r["store"].values()}
    lines += ["", f"Object store of the embedded cluster: {', '.join(map(str, sorted(capacity)))} MiB. "
              "Sampled every 0.5 s; the tree is the job's process and every descendant (embedded Ray). RSS counts a "
              "shared page (the Ray object store's) in every process that maps it; PSS splits it among them."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, every run")
    parser.add_argument("--name", default="load", help="results file stem under benchmarks/results")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        Path(args.out).write_text(json.dumps(run_one(args.one, Path(args.root), args.overrides)))
        return
    meta = provenance()
    runs = []
    for size in sorted(args.sizes):
        runs.append(measure(size, args.overrides))
        print(json.dumps(runs[-1]), flush=True)
    result = {**meta, "runs": runs, "growth": [_growth(a, b) for a, b in zip(runs, runs[1:])]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
