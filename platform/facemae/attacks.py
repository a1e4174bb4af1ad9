"""Attackers stronger than the fixed judge (DESIGN.md "Who sees what"), for an experiment's releases.

- The **adaptive attacker** knows the method. It holds the public faces (the training identities'
  originals), the released generator and the release. It masks the public faces the owner's way (the same
  ratio and patch size, its own draw of masks), releases them with the generator, and fine-tunes the judge
  on those public releases beside their originals: the judge's weights *and* class centres, the judge's FR
  recipe. The public identities are the judge's own classes, so the fine-tune pulls each release towards
  the centre where its identity's originals sit, and keeps the originals there (a fine-tune on releases
  alone drifts the originals away: on a planted colour-and-blur release it found 0.35 of identities where
  the mixed set finds 1.0). It then retrieves the deployment release against the deployment
  originals exactly as the judge does: ``adaptive_identity_leak@1``, ``adaptive_image_leak@1``.
- **Membership inference**: is a person's identity in the release? Members are the deployment identities,
  non-members identities of the same distribution never released (``experiment.nonmembers``; with
  synthetic faces, a dataset drawn with another seed). Each original face scores its highest similarity to
  any released face (:func:`facemae.measures.privacy.nearest_release_similarity`), by the fixed judge and by
  the adaptive attacker: ROC AUC and TPR at 1% FPR.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa

from facemae import storage
from facemae.config import Config
from facemae.data.ingest import ingest
from facemae.data.owner import mask_dataset
from facemae.data.runner import finish, prepare_output, reusable
from facemae.data.shards import MANIFEST, RELEASED_SCHEMA, Manifest, read_table, sha256_file, verify_dataset, write_shard
from facemae.eval.evaluate import membership, privacy
from facemae.generate.release import generate_released
from facemae.train.roles import judge_config
from facemae.train.trainer import train

# The attacker's masks are its own draw: the owner's mask seed plus this.
ATTACKER_MASK_SEED = 7919
# Fine-tunes start from the judge with a seed of their own (data order, dropout): judge seed plus this.
ATTACKER_TRAIN_SEED = 2000
ADAPTIVE_KEYS = ("identity_leak@1", "image_leak@1", "identity_leak@5", "image_leak@5")


def public_masked(config: Config) -> str:
    """The public faces masked the owner's way (``mask.ratio``, ``mask.patch_size``) with the attacker's own
    mask seed: the training split of ``data.output``, into ``<masked dataset>-public``. Reused once made."""
    output = f"{config.masked_output().rstrip('/')}-public"
    mask = dataclasses.replace(config.mask, splits=["train"], seed=config.mask.seed + ATTACKER_MASK_SEED,
                               output=output)
    mask_dataset(dataclasses.replace(config, mask=mask))
    return output


def public_release(config: Config, row: str, *, weights: str = "", name: str) -> str:
    """The attacker's release of the public faces for one row: the originals themselves, the masked view,
    or the row's generator (``weights``) on :func:`public_masked`; ``name`` tells generators apart."""
    if row == "originals":
        return config.data.output
    masked = public_masked(config)
    method = "masked" if row == "masked" else "reconstruct"
    generate = dataclasses.replace(config.generate, method=method, weights=weights, output="", masked="")
    out = f"{masked}-{'masked' if row == 'masked' else name}"
    generate_released(dataclasses.replace(config, generate=generate), masked=masked, output=out)
    return out


def attacker_training_set(config: Config, public: str) -> str:
    """What the adaptive attacker fine-tunes on: the public originals and the public release of them in one
    dataset (``<public>-with-originals``), each shard a public original shard and its released twin, so
    that both kinds of image learn to sit at their identity's class centre. Reused once made; the originals
    row's public release is the originals themselves, fine-tuned on as they are.

    Raises:
        ValueError: The release's training shards do not pair with the originals' (not released from them).
    """
    if public == config.data.output:
        return public
    originals, release = verify_dataset(config.data.output), verify_dataset(public)
    output = f"{public.rstrip('/')}-with-originals"
    fingerprint = {"stage": "attacker-training-set",
                   "originals_manifest": sha256_file(storage.join(config.data.output, MANIFEST)),
                   "release_manifest": sha256_file(storage.join(public, MANIFEST))}
    if reusable(output, fingerprint, overwrite=False) is not None:
        return output
    pairs = [(a.file, b.file) for a, b in zip(originals.splits.get("train", []), release.splits.get("train", []))]
    if not pairs or len(pairs) != len(originals.splits["train"]) or any(a != b for a, b in pairs):
        raise ValueError(f"{public}'s training shards do not pair with {config.data.output}'s: release the public faces "
                         "of that dataset (attacks.public_release)")
    prepare_output(output, overwrite=False)
    shards = []
    for name, _ in pairs:
        own = read_table(storage.join(config.data.output, name), columns=["image_id", "identity", "image"])
        out = read_table(storage.join(public, name), columns=["image_id", "source_id", "identity", "image"])
        ids = own.column("image_id").to_pylist()
        both = pa.concat_tables([pa.table({"image_id": [f"{i}#original" for i in ids], "source_id": ids,
                                           "identity": own.column("identity"), "image": own.column("image")},
                                          schema=RELEASED_SCHEMA), out.cast(RELEASED_SCHEMA)])
        shards.append(write_shard(output, name, both))
    Manifest(kind="released", settings=fingerprint, identity_names=originals.identity_names,
             source={"type": "dataset", "path": str(public), "kind": "released", "method": "public release with "
                     "its originals (the adaptive attacker's training set)"},
             splits={"train": shards}, report={"images": sum(s.rows for s in shards)}).write(output)
    finish(output)
    return output


def adaptive_config(config: Config, *, judge: str, name: str, seed: int) -> Config:
    """The fine-tune of the judge on a public release: the judge's recipe for ``experiment.adaptive_steps``
    steps, starting from its weights and class centres."""
    base = judge_config(config)
    return dataclasses.replace(base, name=name, train=dataclasses.replace(
        base.train, max_steps=config.experiment.adaptive_steps, seed=seed + ATTACKER_TRAIN_SEED,
        init_weights=judge, init_head=True))


def adaptive_attacker(config: Config, *, judge: str, public: str, name: str, seed: int) -> str:
    """Fine-tunes the judge on the public release ``public`` beside its originals
    (:func:`attacker_training_set`); returns the attacker's weights. A finished run of the same name is reused."""
    dataset = attacker_training_set(config, public)
    return train(adaptive_config(config, judge=judge, name=name, seed=seed), dataset=dataset, split="train").weights


def nonmembers(config: Config) -> str:
    """The dataset of identities never released that membership inference tests against: ``experiment.nonmembers``,
    or with synthetic faces one drawn with ``data.seed + 1`` (other identities, the same distribution) with as
    many identities as the deployment split, at ``<data.output>-nonmembers``.

    Raises:
        ValueError: No ``experiment.nonmembers`` and a source that cannot draw new identities.
    """
    if config.experiment.nonmembers:
        return config.experiment.nonmembers
    if config.data.source != "synthetic":
        raise ValueError("membership inference needs identities that were never released: set experiment.nonmembers "
                         f"to an ingested dataset of other people (data.source={config.data.source} cannot draw them)")
    deployed = len(verify_dataset(config.data.output).identities("deploy"))
    data = dataclasses.replace(config.data, output=f"{config.data.output.rstrip('/')}-nonmembers", seed=config.data.seed + 1,
                               num_identities=max(deployed, 4), val_fraction=0.0)
    ingest(dataclasses.replace(config, data=data))
    return data.output


def nonmember_sets(dataset: str) -> list[tuple[str, str]]:
    """Every split of a non-member dataset: none of its identities is released."""
    manifest = verify_dataset(dataset)
    return [(dataset, split) for split in manifest.splits if manifest.num_images(split)]


def attack_scores(config: Config, *, row: str, seed: int, judge: str, weights: str, released: str,
                  gallery_cache: str | None, name: str) -> dict[str, Any]:
    """The stronger attackers' numbers for one row and seed: ``adaptive_*`` leaks, and membership inference by the
    fixed judge (``mia_auc``, ``mia_tpr@1%fpr``, ``mia_roc``) and by the adaptive attacker (``adaptive_mia_*``).

    Args:
        row: ``originals``, ``masked``, ``mae`` or ``facemae``.
        judge: The fixed judge's weights.
        weights: The row's generator (``mae`` / ``facemae``); empty otherwise.
        released: The row's release of the deployment identities.
        name: Names this row's attacker runs and public release (unique per generator).
    """
    public = public_release(config, row, weights=weights, name=name)
    attacker = adaptive_attacker(config, judge=judge, public=public, name=f"{config.name}-adaptive-{name}", seed=seed)
    adaptive = privacy(config, attacker, released=released, originals=config.data.output, gallery_cache=gallery_cache)
    outsiders = nonmember_sets(nonmembers(config))
    scores: dict[str, Any] = {f"adaptive_{k}": adaptive[k] for k in ADAPTIVE_KEYS}
    for prefix, model in (("", judge), ("adaptive_", attacker)):
        mia = membership(config, model, released=released, members=(config.data.output, "deploy"),
                         nonmembers=outsiders)
        scores.update({f"{prefix}{k}": v for k, v in mia.items()})
    scores["adaptive_weights"] = attacker
    scores["public_release"] = public if storage.is_remote(public) else str(public)
    return scores
