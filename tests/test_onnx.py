"""ONNX export (``facemae export``): onnxruntime gives what torch gives, on real faces and any batch size.

Tiny models with their random initial weights: what is checked is the exported computation, not what
a model learnt. Faces are synthetic, stored as PNG and decoded as evaluation decodes them; the
generator is fed masked-shard records exactly as ``facemae generate`` decodes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from facemae.cli import main
from facemae.data.images import decode_rgb, encode_png
from facemae.data.masking import mask_face, patchify
from facemae.data.synthetic import generate_image, image_id
from facemae.generate.release import Reconstructor
from facemae.models.fr import to_model_range, to_uint8
from facemae.models.mae import masked_record_input
from facemae.models.registry import build_fr, build_mae
from facemae.models.weights import (ONNX_OPSET, WeightsError, export_onnx, load_fr_backbone, load_mae,
                                    read_onnx_description, save_weights)

TOL = 1e-4  # max abs difference allowed between onnxruntime and torch
PATCH, KEEP = 8, 49  # 196 patches of 8 px, 75% removed: the smoke configs' masks
FR_INFO = {"task": "fr", "model": "fr_tiny", "embedding_size": 32, "run": "teacher"}
MAE_INFO = {"task": "mae", "model": "facemae_vit_tiny_p8", "norm_pix_loss": False, "run": "smoke"}


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """Five faces of five identities, ``[5, 112, 112, 3]`` uint8, through a PNG round trip as shards hold them."""
    return np.stack([decode_rgb(encode_png(generate_image(i, 0, seed=3))) for i in range(5)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Weights of an FR backbone and a FaceMAE, each exported once to ONNX."""
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    out = {"fr_weights": save_weights(build_fr("fr_tiny", embedding_size=32), root / "fr", FR_INFO),
           "mae_weights": save_weights(build_mae("facemae_vit_tiny_p8"), root / "mae", MAE_INFO)}
    out["fr"] = export_onnx(out["fr_weights"], root / "fr.onnx")
    out["mae"] = export_onnx(out["mae_weights"], root / "mae.onnx")
    return out


@pytest.fixture(scope="module")
def sessions(exported) -> dict[str, object]:
    import onnxruntime as ort

    return {task: ort.InferenceSession(str(exported[task]), providers=["CPUExecutionProvider"])
            for task in ("fr", "mae")}


def _records(faces: np.ndarray) -> tuple[list[bytes], list[bytes]]:
    """Masked-shard records of faces: each one's visible patches and mask, as `facemae mask` writes them."""
    pairs = [mask_face(face, image_id=image_id(i, 0), patch_size=PATCH, keep=KEEP, seed=0)
             for i, face in enumerate(faces)]
    return [v for v, _ in pairs], [m for _, m in pairs]


@pytest.mark.parametrize("n", [1, 5])
def test_fr_onnx_embeds_faces_as_torch_does(exported, sessions, faces, n):
    x = to_model_range(torch.from_numpy(faces[:n]))  # (n, 3, 112, 112) in [-1, 1]
    with torch.inference_mode():
        expected = load_fr_backbone(exported["fr_weights"])(x).numpy()
    (embedding,) = sessions["fr"].run(None, {"image": x.numpy()})
    assert embedding.shape == (n, 32) and np.abs(expected).max() > 0.1  # not a degenerate all-zero model
    assert np.abs(embedding - expected).max() < TOL


def test_fr_onnx_gives_the_verification_embeddings(exported, sessions, faces):
    from facemae.eval.verification import embed_images

    x = to_model_range(torch.from_numpy(faces)).numpy()
    (embedding,) = sessions["fr"].run(None, {"image": np.concatenate([x, x[..., ::-1]])})  # then the flips
    summed = embedding[:5] + embedding[5:]
    ours = summed / np.linalg.norm(summed, axis=1, keepdims=True)
    expected = embed_images(load_fr_backbone(exported["fr_weights"]), faces)
    assert np.abs(ours - expected).max() < TOL


@pytest.mark.parametrize("n", [1, 5])
def test_generator_onnx_releases_what_generate_computes(exported, sessions, faces, n):
    visible, mask = _records(faces[:n])
    imgs, removed = masked_record_input(visible, mask, patch_size=PATCH)  # what Reconstructor feeds the model
    model = load_mae(exported["mae_weights"])
    with torch.inference_mode():
        _, pred, _ = model(imgs, mask=removed)
        expected = model.compose(imgs, pred, removed), model.compose(imgs, pred, removed, paste_visible=False)
    released, prediction = sessions["mae"].run(None, {"image": imgs.numpy(), "mask": removed.numpy()})
    assert released.shape == prediction.shape == (n, 3, 112, 112)
    assert np.abs(released - expected[0].numpy()).max() < TOL
    assert np.abs(prediction - expected[1].numpy()).max() < TOL
    assert np.abs(released - prediction).max() > 0.1  # the two outputs differ where patches are visible

    # The PNGs generate writes: equal up to rounding a value within TOL of a .5 step, and the owner's
    # visible patches bit-exact.
    ours = to_uint8(torch.from_numpy(released)).numpy()  # (n, 112, 112, 3)
    batch = {"visible": np.array(visible, dtype=object), "mask": np.array(mask, dtype=object),
             "image_id": np.array([image_id(i, 0) for i in range(n)]), "source_id": np.array(["s"] * n),
             "identity": np.arange(n), "path": np.array(["p"] * n)}
    pngs = Reconstructor(str(exported["mae_weights"]), method="reconstruct", patch_size=PATCH,
                         paste_visible=True)(batch)["image"]
    written = np.stack([decode_rgb(png) for png in pngs])
    assert np.abs(ours.astype(int) - written).max() <= 1
    for face, vis, m in zip(ours, visible, mask):
        kept = np.frombuffer(m, dtype=np.uint8) == 0
        assert np.array_equal(patchify(face, PATCH)[kept], np.frombuffer(vis, dtype=np.uint8).reshape(KEEP, -1))


def test_generator_onnx_reads_the_keep_count_from_the_mask(exported, sessions, faces):
    # A mask of another ratio than the example the graph was traced with: the count is not baked in.
    visible, mask = zip(*[mask_face(face, image_id=image_id(i, 0), patch_size=PATCH, keep=98, seed=1)
                          for i, face in enumerate(faces[:3])])
    imgs, removed = masked_record_input(visible, mask, patch_size=PATCH)
    model = load_mae(exported["mae_weights"])
    with torch.inference_mode():
        _, pred, _ = model(imgs, mask=removed)
        expected = model.compose(imgs, pred, removed).numpy()
    released, _ = sessions["mae"].run(None, {"image": imgs.numpy(), "mask": removed.numpy()})
    assert np.abs(released - expected).max() < TOL


def test_the_model_says_what_it_is_and_how_to_feed_it(exported):
    import onnx

    fr = onnx.load(str(exported["fr"]))
    props = {p.key: p.value for p in fr.metadata_props}
    assert json.loads(props["facemae"]) == FR_INFO
    assert props["opset"] == str(ONNX_OPSET) == "18"
    assert [(o.domain, o.version) for o in fr.opset_import if o.domain in ("", "ai.onnx")] == [("", 18)]
    assert "(x / 255 - 0.5) / 0.5" in props["input_normalisation"] and "RGB (not BGR), NCHW" in fr.doc_string
    assert read_onnx_description(exported["fr"]) == {
        "path": str(exported["fr"]), "task": "fr", "model": "fr_tiny", "run": "teacher", "opset": 18,
        "inputs": {"image": ["batch", 3, 112, 112]}, "outputs": {"embedding": ["batch", 32]},
        "input_normalisation": props["input_normalisation"]}
    mae = read_onnx_description(exported["mae"])
    assert (mae["task"], mae["model"], mae["opset"]) == ("mae", "facemae_vit_tiny_p8", 18)
    assert mae["inputs"] == {"image": ["batch", 3, 112, 112], "mask": ["batch", 196]}
    assert mae["outputs"] == {"released": ["batch", 3, 112, 112], "prediction": ["batch", 3, 112, 112]}
    assert "1 = removed, 0 = visible" in mae["input_normalisation"]


def test_cli_writes_the_model_and_sums_it_up(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACEMAE_LOG_DIR", str(tmp_path / "logs"))
    out = tmp_path / "deploy" / "teacher.onnx"
    assert main(["export", "--weights", str(exported["fr_weights"].parent), "--onnx", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"path": str(out), "task": "fr", "model": "fr_tiny", "run": "teacher", "opset": 18,
                       "inputs": {"image": ["batch", 3, 112, 112]}, "outputs": {"embedding": ["batch", 32]}}
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher.onnx"]  # no temporary file left


def test_wrong_input_is_one_line_and_exit_status_2(exported, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("FACEMAE_LOG_DIR", str(tmp_path / "logs"))
    (tmp_path / "notes.safetensors").write_text("not weights at all\n")
    save_file(build_fr("fr_tiny", embedding_size=32).state_dict(), str(tmp_path / "bare.safetensors"))
    out = tmp_path / "out.onnx"
    cases = {
        "notes.safetensors": f"{tmp_path / 'notes.safetensors'} is not a readable safetensors file",
        "nowhere.safetensors": f"{tmp_path / 'nowhere.safetensors'} does not exist",
        "bare.safetensors": "without a facemae description (not exported by a facemae run); ONNX export needs an "
                            "FR backbone (task=fr) or a FaceMAE (task=mae)",
    }
    for name, message in cases.items():
        assert main(["export", "--weights", str(tmp_path / name), "--onnx", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.startswith("facemae export: error: ") and "\n" not in err, err
    assert main(["export", "--weights", str(exported["fr_weights"]), "--onnx", str(out), "--opset", "11"]) == 2
    assert "ONNX opset 11 is not one the exporter writes reliably; pass an opset from 18" in capsys.readouterr().err
    assert main(["export", "--weights", str(exported["fr_weights"]), "--onnx", str(tmp_path / "fr.safetensors")]) == 2
    assert "fr.safetensors does not end in .onnx" in capsys.readouterr().err
    assert not out.exists()


def test_a_norm_pix_loss_facemae_is_refused_before_any_export(tmp_path):
    weights = save_weights(build_mae("facemae_vit_tiny_p8", norm_pix_loss=True), tmp_path / "npl",
                           {**MAE_INFO, "norm_pix_loss": True})
    with pytest.raises(WeightsError, match="trained with norm_pix_loss, whose predictions are per-patch-normalised"):
        export_onnx(weights, tmp_path / "npl.onnx")
    assert not (tmp_path / "npl.onnx").exists()
