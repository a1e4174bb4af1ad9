"""Typed config: YAML + dotted overrides, unknown keys and impossible combinations refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from facemae.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_derived_values_are_computed():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.mask.patch_size == 8 and cfg.mask.ratio == 0.75
    assert cfg.mask.num_patches == 196 and cfg.mask.keep == 49  # int(196 * 0.25)
    assert cfg.masked_output() == "data/synthetic-masked"


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  num_identities: 10\n  seed: 3\nmask:\n  ratio: 0.5\n")
    cfg = load_config(path, ["data.num_identities=20", "mask.patch_size=16", "model.mae=facemae_vit_base_p16",
                             "data.num_identities=30",
                             "ray.address=auto", "mask.splits=[deploy]"])
    assert cfg.data.num_identities == 30 and cfg.data.seed == 3
    assert cfg.mask.patch_size == 16 and cfg.mask.ratio == 0.5
    assert cfg.mask.keep == int(49 * 0.5)
    assert cfg.ray.address == "auto" and cfg.mask.splits == ["deploy"]


def test_int_is_accepted_for_float_but_not_bool_for_int():
    assert load_config(None, ["mask.ratio=0"]).mask.ratio == 0.0
    with pytest.raises(ValueError, match=r"data.num_identities must be int, got True"):
        load_config(None, ["data.num_identities=true"])
    with pytest.raises(ValueError, match=r"mask.ratio must be float, got 'high'"):
        load_config(None, ["mask.ratio=high"])


@pytest.mark.parametrize("override, message", [
    ("data.num_identites=5", r"unknown key\(s\) data.num_identites; valid keys under data: .*num_identities"),
    ("trainer.lr=1", r"unknown key\(s\) trainer; valid keys: data, eval, experiment, frontier, generate, loss, mask, model, name, ray, storage, tracking, train"),
    ("mask.patch_size=10", r"mask.patch_size=10 must divide the image size 112"),
    ("mask.ratio=1.0", r"mask.ratio=1.0 must be in \[0, 1\)"),
    ("data.deploy_fraction=1.5", r"data.deploy_fraction=1.5 must be in \[0, 1\)"),
    ("data.source=webdataset", r"data.source='webdataset' is not one of"),
    ("data.source=folder", r"data.source='folder' needs data.path"),
    ("mask.splits=[test]", r"mask.splits=\['test'\] must be a non-empty subset"),
    ("data.rows_per_shard=0", r"data.rows_per_shard=0 must be >= 1"),
    ("data.output=s3://", r"data.output=s3://: no bucket named; write s3://<bucket>/<prefix>"),
    ("mask.output=ftp://x/y", r"mask.output=ftp://x/y: unsupported storage scheme 'ftp://'"),
    ("storage.endpoint_override=ftp://host", r"storage.endpoint_override='ftp://host' must be an S3 endpoint"),
    ("nonsense", r"override 'nonsense' must look like section.key=value"),
    ("data=3", r"data must be a mapping"),
])
def test_bad_values_name_the_fix(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_impossible_combinations():
    with pytest.raises(ValueError, match="keeps no patch of the 4; lower the ratio or the patch size"):
        load_config(None, ["mask.patch_size=56", "mask.ratio=0.8"])
    with pytest.raises(ValueError, match="ray.num_cpus applies only to an embedded cluster"):
        load_config(None, ["ray.address=auto", "ray.num_cpus=4"])
    with pytest.raises(ValueError, match="ray.object_store_mib applies only to an embedded cluster"):
        load_config(None, ["ray.address=auto", "ray.object_store_mib=2048"])
    with pytest.raises(ValueError, match="ray.object_store_mib=64 is below Ray's minimum.*at least 80"):
        load_config(None, ["ray.object_store_mib=64"])
    assert load_config(None, ["ray.object_store_mib=2048"]).ray.object_store_bytes() == 2048 * 2**20


def test_every_job_config_and_its_smoke_twin_load():
    configs = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
    assert configs, "no job configs"
    for path in configs:
        assert isinstance(load_config(path), Config), path


def test_experiment_deploy_is_data_but_for_what_it_sets_and_needs_its_own_folder(tmp_path):
    config = load_config(Path(__file__).parents[1] / "jobs/configs/experiment_smoke.yaml", [
        "experiment.deploy.output=data/shifted", "experiment.deploy.domain=shifted", "experiment.deploy.seed=7"])
    deploy, data = config.experiment.deploy, config.data
    assert (deploy.output, deploy.domain, deploy.seed) == ("data/shifted", "shifted", 7)
    assert (deploy.num_identities, deploy.images_per_identity, deploy.rows_per_shard) == (16, 6, 24)  # data's
    assert (data.domain, data.seed, data.output) == ("base", 0, "data/experiment-smoke")
    assert load_config(None).experiment.deploy is None
    smoke = Path(__file__).parents[1] / "jobs/configs/experiment_smoke.yaml"
    with pytest.raises(ValueError, match="experiment.deploy.output=data/experiment-smoke is data.output: .*folder"):
        load_config(smoke, ["experiment.deploy.output=data/experiment-smoke", "experiment.deploy.domain=shifted"])
    with pytest.raises(ValueError, match="experiment.deploy.output is not set: .*experiment.deploy.output=data/"):
        load_config(smoke, ["experiment.deploy.domain=shifted"])
    with pytest.raises(ValueError, match="data.domain='moon' is not one of"):
        load_config(None, ["experiment.deploy.output=x", "experiment.deploy.domain=moon"])


def test_absolute_resolves_every_local_path_against_the_working_directory_and_keeps_urls(tmp_path, monkeypatch):
    """What a config sends to Ray Train workers, Tune trials and actors, which start in folders of their own."""
    from facemae.config import LOCAL_PATHS

    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["data.output=data/x", "mask.output=s3://bucket/masked", "train.teacher=t/w.safetensors",
                                "train.storage_path=runs", "generate.output=gs://b/out", "experiment.deploy.output=d",
                                "experiment.deploy.source=synthetic", "frontier.ledger=ledger"])
    a = config.absolute()
    assert a.data.output == str(tmp_path / "data" / "x") and a.train.teacher == str(tmp_path / "t" / "w.safetensors")
    assert a.train.storage_path == str(tmp_path / "runs") and a.frontier.ledger == str(tmp_path / "ledger")
    assert a.experiment.deploy is not None and a.experiment.deploy.output == str(tmp_path / "d")
    assert (a.mask.output, a.generate.output) == ("s3://bucket/masked", "gs://b/out")  # URLs as written
    assert (a.train.judge, a.generate.weights, a.data.path) == ("", "", None)  # unset stays unset
    assert a.data.num_identities == config.data.num_identities and a.name == config.name
    # Every setting named there exists (a renamed one would be left relative without a word).
    for section, keys in LOCAL_PATHS.items():
        assert all(hasattr(getattr(config, section), k) for k in keys), section
    assert a.absolute() == a  # idempotent
