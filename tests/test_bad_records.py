"""A bad record inside a checksum-valid shard (issue 11): named when it stops a stage, counted when skipped.

The shards here match their manifest (the corruption rewrote the checksums too), so only decoding finds
the bad row. Without ``data.skip_corrupt`` every stage must stop with a ``CorruptImageError`` naming the
dataset folder, the shard file and the image_id (one line at the CLI, even from a Ray worker); with it,
the row is left out and counted wherever images are decoded.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from facemae.config import load_config
from facemae.data.images import CorruptImageError
from facemae.data.ingest import ingest
from facemae.data.owner import mask_dataset
from facemae.data.shards import iter_rows, read_manifest
from facemae.data.transforms import image_uid
from facemae.models.weights import save_weights

# 8 training identities x 4 = 32 training rows (two shards of 16), 2 deployment identities x 4 = 8 rows:
# 32 rows make whole micro-batches of 8 in one process and on each of two workers (16 rows each).
DATA = ["data.num_identities=10", "data.images_per_identity=4", "data.deploy_fraction=0.2", "data.val_fraction=0",
        "data.rows_per_shard=16", "data.workers=1"]
TINY = ["model.mae=facemae_vit_tiny_p8", "model.fr=fr_tiny", "model.teacher=fr_tiny", "model.embedding_size=64",
        "train.micro_batch=8", "train.metrics_port=0", "train.base_lr=0.016", "train.warmup_steps=2",
        "loss.lambda_irm=0", "train.val_every=0", "generate.batch_size=8", "generate.actors=1"]


def corrupt_row(root: Path, split: str, *, column: str = "image", row: int = 3) -> tuple[str, str]:
    """Cuts one cell of the split's first shard to half its bytes and rewrites the manifest's checksum
    and row count to match, as a bad copy or a buggy writer would leave it.

    Returns:
        ``(shard file relative to root, image_id of the bad row)``.
    """
    manifest = json.loads((root / "manifest.json").read_text())
    shard = manifest["splits"][split][0]
    path = root / shard["file"]
    table = pq.read_table(path)
    cells = table.column(column).to_pylist()
    cells[row] = cells[row][: len(cells[row]) // 2]  # a truncated PNG / a short visible-patch record
    table = table.set_column(table.schema.get_field_index(column), table.schema.field(column),
                             pa.array(cells, type=table.schema.field(column).type))
    pq.write_table(table, path, compression="zstd")
    shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    shard["rows"] = table.num_rows
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return shard["file"], table.column("image_id")[row].as_py()


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """An original dataset with one corrupt training image and one corrupt deployment image, the
    deployment split masked from the good copy with one masked record corrupted afterwards, and an
    untrained tiny FaceMAE and FR backbone."""
    from facemae.models.registry import build_fr, build_mae

    root = tmp_path_factory.mktemp("bad")
    config = load_config(None, [*DATA, *TINY, f"data.output={root / 'orig'}", f"mask.output={root / 'masked'}",
                                "mask.splits=[deploy]"])
    ingest(config)
    mask_dataset(config)
    torch.manual_seed(0)
    mae = save_weights(build_mae("facemae_vit_tiny_p8"), root / "mae",
                       {"task": "mae", "model": "facemae_vit_tiny_p8", "norm_pix_loss": False})
    fr = save_weights(build_fr("fr_tiny", embedding_size=64), root / "fr",
                      {"task": "fr", "model": "fr_tiny", "embedding_size": 64})
    return {"orig": root / "orig", "masked": root / "masked", "mae": str(mae), "fr": str(fr),
            "train_row": corrupt_row(root / "orig", "train"), "deploy_row": corrupt_row(root / "orig", "deploy", row=5),
            "masked_row": corrupt_row(root / "masked", "deploy", column="visible", row=2)}


def _config(bad: dict, tmp_path: Path, *overrides: str):
    return load_config(None, [*DATA, *TINY, f"data.output={bad['orig']}", f"mask.output={bad['masked']}",
                              f"generate.masked={bad['masked']}", f"generate.weights={bad['mae']}",
                              f"train.storage_path={tmp_path / 'runs'}", *overrides])


def _names(message: str, root: Path, shard: str, image_id: str) -> None:
    assert f"dataset {root}" in message and f"shard {shard}" in message and f"image_id {image_id}" in message, \
        message


LOCAL_SCRIPT = """
import json, sys
from facemae.config import load_config
from facemae.data.images import CorruptImageError
from facemae.train.trainer import train
out = {}
try:
    train(load_config(None, sys.argv[1:] + ["name=strict"]))
except CorruptImageError as exc:
    out["error"] = str(exc)
result = train(load_config(None, sys.argv[1:] + ["name=skip", "data.skip_corrupt=true"]))
out["metrics"] = result.metrics
resumed = train(load_config(None, sys.argv[1:] + ["name=skip", "data.skip_corrupt=true", "train.max_steps=12"]))
out["resumed"] = resumed.metrics
print(json.dumps(out))
"""


def test_local_training_names_the_bad_row_or_skips_and_counts_it_once(tmp_path, bad):
    """One process, no Ray (train.num_workers=0); a process of its own, as local mode sets up a process group."""
    args = [*DATA, *TINY, f"data.output={bad['orig']}", f"train.storage_path={tmp_path / 'runs'}",
            "train.num_workers=0", "train.max_steps=8", "train.log_every=4",
            "train.checkpoint_every=8", "train.log_sample_ids=true"]
    out = subprocess.run([sys.executable, "-c", LOCAL_SCRIPT, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    shard, image_id = bad["train_row"]
    _names(result["error"], bad["orig"], shard, image_id)
    assert "data.skip_corrupt=true" in result["error"]

    # 8 steps of 8 = two epochs over the 32 rows: the bad row is read twice and counts once (distinct rows);
    # logged at steps 4 and 8, then at 12 by the resumed run.
    lines = [json.loads(x) for x in (tmp_path / "runs" / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [4, 8, 12]
    assert [m["corrupt_skipped"] for m in lines] == [1, 1, 1] and result["metrics"]["corrupt_skipped"] == 1
    assert [m["images_trained"] for m in lines] == [31, 62, 93] and result["metrics"]["images_trained"] == 62
    trained = (tmp_path / "runs" / "skip" / "sample_ids" / "rank000.txt").read_text().split()
    assert len(trained) == 3 * 31 and str(image_uid(image_id)) not in trained
    # Resumed from step 8 for a third epoch: the totals go on from the checkpoint's, the row still counts once.
    assert result["resumed"]["step"] == 12 and result["resumed"]["corrupt_skipped"] == 1


@pytest.mark.ray
def test_two_workers_sum_images_and_corrupt_rows_over_ranks(tmp_path, bad, ray_cluster):
    from facemae.train.trainer import train

    # No local shuffle buffer: one of 256 rows would hold a rank's whole share of the 3 passes the run
    # streams and hand it out in random order, so that in about 1 run of 25 none of the bad row's three
    # copies was among the 64 rows trained.
    config = _config(bad, tmp_path, "name=two", "data.skip_corrupt=true", "train.num_workers=2",
                     "train.max_steps=4", "train.log_every=2", "train.checkpoint_every=4", "train.log_sample_ids=true",
                     "train.shuffle_buffer=0")
    result = train(config)
    # Each worker takes 2 micro-batches of 8 per epoch from one stream of passes over the 32 rows: 4 steps
    # are 64 rows of the stream, about two passes, so the bad row was dealt 1 to 3 times (to either rank)
    # and dropped each time; the run's totals count every trained row and the bad row once.
    trained = [(Path(result.run_dir) / "sample_ids" / f"rank{r:03d}.txt").read_text().split() for r in (0, 1)]
    assert str(image_uid(bad["train_row"][1])) not in trained[0] + trained[1]
    images = len(trained[0]) + len(trained[1])
    assert 64 - 3 <= images <= 64 - 1
    lines = [json.loads(x) for x in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["images_trained"] == result.metrics["images_trained"] == images  # the run's, not rank 0's
    assert lines[-1]["corrupt_skipped"] == result.metrics["corrupt_skipped"] == 1
    totals = json.loads((Path(result.checkpoint) / "run_totals.json").read_text())
    assert totals == {"images_trained": images, "corrupt_uids": [image_uid(bad["train_row"][1])]}


def test_masking_skips_and_lists_the_bad_original(tmp_path, bad):
    config = _config(bad, tmp_path, f"mask.output={tmp_path / 'm'}", "mask.splits=[train,deploy]")
    with pytest.raises(CorruptImageError) as info:
        mask_dataset(config)
    _names(str(info.value), bad["orig"], *bad["train_row"])
    manifest = mask_dataset(_config(bad, tmp_path, f"mask.output={tmp_path / 'm2'}", "mask.splits=[train,deploy]",
                                    "data.skip_corrupt=true"))
    assert manifest.report["corrupt"] == 2 and manifest.num_images() == 40 - 2
    assert sorted(r["image_id"] for r in manifest.report["corrupt_records"]) == \
        sorted([bad["train_row"][1], bad["deploy_row"][1]])


def test_a_corrupt_row_is_found_inside_rays_wrappers():
    """The shapes Ray gives a worker's error (checked against a real two-worker run, whose CLI line was
    ``facemae train: bad input: dataset ..., shard train/part-00000.parquet, image_id ...``): Train V2's
    ``WorkerGroupError`` per rank, holding the error itself or a ``RayTaskError`` that also claims its type."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from facemae.cluster import input_error, input_errors_unwrapped

    error = CorruptImageError("dataset d, shard train/part-00000.parquet, image_id x", "undecodable image", "fix")
    wrapped = RayTaskError("SplitCoordinator.get", "  File ...\nCorruptImageError: ...", error).as_instanceof_cause()
    assert isinstance(wrapped, CorruptImageError) and "File ..." in str(wrapped)  # why the CLI must unwrap
    for failure in (WorkerGroupError("snippet", {0: RuntimeError("other rank"), 1: error}),
                    WorkerGroupError("snippet", {0: wrapped}), wrapped):
        assert input_error(failure) is error
        with pytest.raises(CorruptImageError) as info, input_errors_unwrapped():
            raise failure
        assert str(info.value) == str(error) and "Traceback" not in str(info.value)
    assert input_error(WorkerGroupError("snippet", {0: RuntimeError("a bug")})) is None


@pytest.mark.ray
def test_generation_error_reaches_the_cli_as_one_line(tmp_path, bad, ray_cluster, capsys):
    from facemae.cli import main

    overrides = [*DATA, *TINY, f"generate.masked={bad['masked']}", f"generate.weights={bad['mae']}"]
    code = main(["generate", "--output", str(tmp_path / "rel"), *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("facemae generate:")]
    assert len(lines) == 1 and "Traceback" not in err and "RayTaskError" not in err, err
    _names(lines[0], bad["masked"], *bad["masked_row"])
    assert "bad input" in lines[0] and "visible holds" in lines[0]


@pytest.mark.ray
def test_generation_skips_the_bad_record_and_releases_every_other_once(tmp_path, bad, ray_cluster):
    from facemae.generate.release import generate_released

    out = tmp_path / "released"
    manifest = generate_released(_config(bad, tmp_path, f"generate.output={out}", "data.skip_corrupt=true"))
    masked = [r["image_id"] for r in iter_rows(read_manifest(bad["masked"]).files(bad["masked"], "deploy"))]
    released = [r["image_id"] for r in iter_rows(manifest.files(out, "deploy"))]
    shard, image_id = bad["masked_row"]
    assert sorted(released) == sorted(i for i in masked if i != image_id)  # each other row exactly once
    assert manifest.report["images"] == len(masked) - 1 == manifest.num_images()
    assert manifest.report["corrupt"] == 1
    [record] = manifest.report["corrupt_records"]
    assert record["image_id"] == image_id and "visible holds" in record["reason"]
    _names(record["where"], bad["masked"], shard, image_id)


def test_evaluation_names_the_bad_row_or_counts_it(tmp_path, bad):
    from facemae.eval.evaluate import embed_split, verify

    with pytest.raises(CorruptImageError) as info:
        embed_split(_config(bad, tmp_path), bad["fr"], str(bad["orig"]), "train")
    _names(str(info.value), bad["orig"], *bad["train_row"])
    config = _config(bad, tmp_path, "data.skip_corrupt=true", "eval.pairs=20")
    embedded = embed_split(config, bad["fr"], str(bad["orig"]), "train")
    assert len(embedded.image_id) == 31 and bad["train_row"][1] not in embedded.image_id
    assert [s["image_id"] for s in embedded.skipped] == [bad["train_row"][1]]
    scores = verify(config, bad["fr"], pairs_from=str(bad["orig"]))["heldout_pairs"]
    assert scores["corrupt_skipped"] == 1 and scores["corrupt_image_ids"] == [bad["train_row"][1]]


def test_turning_skip_corrupt_on_reuses_the_dataset(bad):
    """A rerun with data.skip_corrupt=true, to get past a bad row a later stage found, must not be
    refused as a dataset built with other settings."""
    before = read_manifest(bad["orig"])
    again = ingest(load_config(None, [*DATA, f"data.output={bad['orig']}", "data.skip_corrupt=true"]))
    assert again.to_json() == before.to_json()
