"""The torch export of a whole run: ``torch_model.load`` of ``export --format=torch`` embeds
X-rays, CT volumes (with attentive slice selection) and reports as ``inference.load`` does,
in a process where jax cannot be imported."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_export import _vision
from tests.tiny_runs import subprocess_env, tiny_run_config
from unimedi_jax import inference, torch_model
from unimedi_jax.evaluation.checkpoint_results import newest_step
from unimedi_jax.interop import torch_export
from unimedi_jax.method import selection
from unimedi_jax.models.vit import token_grid
from unimedi_jax.trainers.pretraining import train

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Left pleural effusion.", "No acute cardiopulmonary process.", "Cardiomegaly."]

# Runs in a fresh interpreter in which any import of jax or flax fails: what a PyTorch-only
# user has. It embeds the inputs of inputs.npz with the export and writes torch.npz.
_TORCH_SIDE = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoJax(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("jax", "jaxlib", "flax"):
                raise ImportError(f"{name} is blocked: the torch side must not import it")

    sys.meta_path.insert(0, NoJax())
    import numpy as np, torch
    import unimedi_jax
    from unimedi_jax import torch_model

    export, inputs, out, xray_file, ct_file = sys.argv[1:]
    data = np.load(inputs)
    model = torch_model.load(export)
    assert isinstance(model, torch.nn.Module)
    xray, ct = model.read_image(xray_file), model.read_volume(ct_file)
    with torch.no_grad():
        np.savez(
            out,
            xray=xray.numpy(),
            ct=ct.numpy(),
            xray_emb=model.encode_image(xray).numpy(),
            ct_emb=model.encode_volume(ct).numpy(),
            images=model.encode_image(torch.from_numpy(data["images"])).numpy(),
            volumes=model.encode_volume(torch.from_numpy(data["volumes"])).numpy(),
            slices=model.select_slices(torch.from_numpy(data["volumes"])).numpy(),
            texts=model.encode_text([str(t) for t in data["texts"]]).numpy(),
            logit_scale=model.logit_scale.numpy(),
        )
    assert not any(m.split(".")[0] in ("jax", "flax") for m in sys.modules)
    """
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("torch_model")
    workdir = root / "run"
    train(tiny_run_config(root / "data", total_steps=2), workdir)
    return workdir


@pytest.fixture(scope="module")
def inputs(run, tmp_path_factory) -> Path:
    config = inference.load_config(run)
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("inputs") / "inputs.npz"
    np.savez(
        path,
        images=rng.random((3, *config.model.image_size), dtype=np.float32),
        volumes=rng.random((3, *config.model.volume_size), dtype=np.float32),
        texts=np.array(TEXTS),
    )
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """An X-ray PNG (not square, so the letterbox matters) and a CT NIfTI in HU."""
    root = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(1)
    xray = root / "xray.png"
    Image.fromarray(rng.integers(0, 256, (300, 260), dtype=np.uint8)).save(xray)
    ct = root / "ct.nii.gz"
    hu = rng.uniform(-1200, 1200, (70, 70, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), ct)
    return xray, ct


def _torch_side(
    export: Path, inputs: Path, files: tuple[Path, Path], tmp_path: Path
) -> dict[str, np.ndarray]:
    out = tmp_path / "torch.npz"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_SIDE, str(export), str(inputs), str(out), *map(str, files)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def _assert_matches_inference(
    run: Path, export: Path, inputs: Path, files: tuple[Path, Path], tmp_path: Path
) -> None:
    theirs = _torch_side(export, inputs, files, tmp_path)
    data = np.load(inputs)
    ours = inference.load(run)
    xray, ct = ours.read_image(files[0]), ours.read_volume(files[1])
    np.testing.assert_array_equal(theirs["xray"], xray)
    np.testing.assert_array_equal(theirs["ct"], ct)
    np.testing.assert_allclose(theirs["xray_emb"], ours.embed_images(xray), atol=1e-4)
    np.testing.assert_allclose(theirs["ct_emb"], ours.embed_volumes(ct), atol=1e-4)
    images = ours.embed_images(data["images"])
    volumes = ours.embed_volumes(data["volumes"])
    texts = ours.embed_texts(list(data["texts"]))
    np.testing.assert_array_equal(theirs["slices"], ours.select_slices(data["volumes"])[0])
    for name, expected in (("images", images), ("volumes", volumes), ("texts", texts)):
        np.testing.assert_allclose(theirs[name], expected, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(np.linalg.norm(theirs[name], axis=1), 1.0, atol=1e-5)
    # The joint pass with the selected slices is what embed_volumes gives, not the volume alone.
    alone = ours.predictor.embed_vision(ours.params, data["volumes"])
    assert np.abs(alone - volumes).max() > 1e-3
    scale = min(np.exp(float(ours.student["logit_scale"]["value"])), 100.0)
    np.testing.assert_allclose(theirs["logit_scale"], scale, rtol=1e-6)


def _export_command(run: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "unimedi_jax.export", f"--workdir={run}", f"--out={out}", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_export_command_writes_the_whole_model_for_torch(run, inputs, files, tmp_path):
    export = tmp_path / "export"
    proc = _export_command(run, export, "--format=torch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((export / "config.json").read_text())
    assert config["format"] == "torch"
    window = list(inference.load_config(run).data.hu_window)
    assert config["preprocessing"]["volume"]["hu_window"] == window
    assert (export / "text" / "tokenizer.json").is_file()
    card = (export / "README.md").read_text()
    assert "torch_model.load" in card and "hu_window" in card
    _assert_matches_inference(run, export, inputs, files, tmp_path)


def test_torch_export_pools_text_at_cls_when_the_run_did(run, inputs, files, tmp_path):
    """The same weights read as a [CLS]-pooled run (as with a pretrained BERT)."""
    copy = tmp_path / "run_cls"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    assert config["text"]["pooling"] == "mean"
    config["text"]["pooling"] = "cls"
    (copy / "config.json").write_text(json.dumps(config))
    export = torch_export.export_run(copy, "torch", tmp_path / "export")
    _assert_matches_inference(copy, export, inputs, files, tmp_path)


def test_model_card_holds_the_held_out_figures(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    figures = {"step": newest_step(copy), "xray/R@10": 0.125, "ct/R@10": 0.3125}
    (copy / "eval.json").write_text(json.dumps(figures))  # the evaluation of the exported step
    export = torch_export.export_run(copy, "timm", tmp_path / "export")
    card = (export / "README.md").read_text()
    assert "| xray/R@10 | 0.1250 |" in card and "| ct/R@10 | 0.3125 |" in card
    assert 'timm.create_model("local-dir:' in card


def test_export_command_refuses_a_size_for_torch(run, tmp_path):
    proc = _export_command(run, tmp_path / "out", "--format=torch", "--size=8,8")
    assert proc.returncode == 2 and "--size applies to the monai and timm" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_load_refuses_other_formats(run, tmp_path):
    export = torch_export.export_run(run, "hf_bert", tmp_path / "bert")
    with pytest.raises(torch_model.ExportNotFoundError, match="hf_bert format"):
        torch_model.load(export)


@pytest.mark.parametrize("attention_layers", ["all", "last"])
def test_vision_tower_matches_the_flax_model(attention_layers):
    """Random weights; the X-ray grid (4x4) differs from the CT slices' (2x2), so each position
    table is checked in its place."""
    model, params = _vision(attention_layers=attention_layers)
    assert token_grid(model.image_size, model.patch_2d) != token_grid(
        model.volume_size[1:], model.patch_2d
    )
    tower = torch_model.VisionTower(torch_export.torch_vision_config(model, 2)).eval()
    state = torch_export.torch_vision_state(params, model)
    tower.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)

    rng = np.random.default_rng(5)
    images = rng.random((2, *model.image_size), dtype=np.float32)
    volumes = rng.random((2, *model.volume_size), dtype=np.float32)
    slices = volumes[:, [1, 6]]
    apply = jax.jit(model.apply)
    with torch.no_grad():
        theirs = {
            "image": tower.image(torch.from_numpy(images)),
            "volume": tower.volume(torch.from_numpy(volumes)),
            "joint": tower.volume(torch.from_numpy(volumes), torch.from_numpy(slices)),
        }
    ours = {
        "image": apply({"params": params}, images),
        "volume": apply({"params": params}, volumes),
        "joint": apply({"params": params}, volumes, slices),
    }
    for name, (tokens, eq1) in theirs.items():
        np.testing.assert_allclose(tokens, ours[name].tokens, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(eq1, ours[name].cls_attention, atol=1e-6, err_msg=name)


def test_top_k_slices_breaks_ties_as_jax():
    """Slices of one depth block always tie; equal blocks too, here (attention in steps)."""
    rng = np.random.default_rng(6)
    grid, depth = (4, 2, 2), 8
    attention = rng.integers(0, 3, (16, 16)).astype(np.float32) / 4
    for k in (1, 2, 3, 5):
        expected = selection.top_k_slices(selection.slice_scores(attention, grid, depth), k)
        theirs = torch_model.top_k_slices(torch.from_numpy(attention), depth, 2, k)
        np.testing.assert_array_equal(theirs.numpy(), np.asarray(expected), err_msg=f"k={k}")
