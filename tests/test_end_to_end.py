"""A tiny run end to end: phantoms -> train -> checkpoint -> resume -> inference -> evaluate."""

import json
import shutil

import jax
import numpy as np
import pytest

from configs.pretrain import get_config
from unimedi_jax import inference
from unimedi_jax.core.errors import ConfigError
from unimedi_jax.evaluation.evaluators import evaluate_checkpoint
from unimedi_jax.method import selection
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.trainers.pretraining import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = get_config("tiny")
    config.total_steps = 3
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 3
    config.eval_limit = 24
    config.evals = ("retrieval", "zero_shot", "cross_modal", "slice_hit_rate")
    train(config, workdir)
    return workdir


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_metrics_checkpoints_and_config(run):
    records = read_metrics(run)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3]
    for key in ("loss", "loss_vl", "loss_icl", "loss_pcl", "learning_rate", "samples_per_sec"):
        assert all(np.isfinite(r[key]) for r in records if "loss" in r), key
    assert any("retrieval_image/image_to_text/R@1" in r for r in records)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["data_dir"] == str(run / "data")
    assert (run / "tokenizer" / "tokenizer.json").exists()
    assert list((run / "tensorboard").iterdir())


def test_resume_continues_the_schedule(run):
    config = get_config("tiny")
    config.total_steps = 5
    config.checkpoint_every_steps = 2
    config.data.data_dir = str(run / "data")
    train(config, run)
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]  # resumed at 3, not restarted at 1


def test_inference_matches_the_model_and_selection(run):
    model = inference.load(run)
    config = model.config
    rng = np.random.default_rng(0)
    images = rng.random((5, *config.model.image_size), dtype=np.float32)
    volumes = rng.random((3, *config.model.volume_size), dtype=np.float32)

    emb = model.embed_images(images)
    assert emb.shape == (5, config.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Batching (fixed size 16, padded) gives what one direct call gives.
    direct = model.model.apply({"params": model.params}, images, method=UniMedI.encode_vision)
    np.testing.assert_allclose(model.image_features(images), direct.tokens[:, 0], atol=1e-5)

    indices, scores = model.select_slices(volumes)
    attention = model.model.apply(
        {"params": model.params}, volumes, method=UniMedI.encode_vision
    ).cls_attention
    grid = tuple(s // p for s, p in zip(volumes.shape[1:], config.model.patch_3d, strict=True))
    expected_scores = selection.slice_scores(attention, grid, volumes.shape[1])
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)
    np.testing.assert_array_equal(indices, selection.top_k_slices(expected_scores, 2))

    joint = model.volume_features(volumes, with_slices=True)
    slices = selection.gather_slices(volumes, indices)
    expected = model.model.apply(
        {"params": model.params}, volumes, slices, method=UniMedI.encode_vision
    ).tokens[:, 0]
    np.testing.assert_allclose(joint, expected, atol=1e-5)
    assert not np.allclose(joint, model.volume_features(volumes))

    texts = model.embed_texts(["Left pleural effusion.", "No pulmonary nodule.", "Cardiomegaly."])
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    # The student's own text path, unbatched.
    enc = model.tokenizer(
        ["Left pleural effusion."], padding="max_length", max_length=config.text.max_length
    )
    one = model.model.apply(
        {"params": model.student},
        np.asarray(enc["input_ids"]),
        np.asarray(enc["attention_mask"]),
        method=UniMedI.embed_text,
    )
    np.testing.assert_allclose(texts[:1], one, atol=1e-5)


def test_inference_uses_the_vision_tower_the_run_names(run, tmp_path):
    """A run embeds with the student's vision tower (``vision_weights``' default), the one L_vl
    trains with the text tower; ``weights="teacher"`` picks the EMA teacher, and so does a run
    saved before the field existed, as it did then."""
    model = inference.load(run)
    images = np.random.default_rng(1).random((3, *model.config.model.image_size), np.float32)

    def cls(params):
        out = model.model.apply({"params": params}, images, method=UniMedI.encode_vision)
        return np.asarray(out.tokens[:, 0])

    student, teacher = cls(model.student), cls(model.teacher)
    assert np.abs(student - teacher).max() > 1e-4  # 3 EMA steps apart
    np.testing.assert_allclose(model.image_features(images), student, atol=1e-5)
    np.testing.assert_allclose(model.image_features(images, weights="teacher"), teacher, atol=1e-5)
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    saved = json.loads((old / "config.json").read_text())
    del saved["vision_weights"]
    (old / "config.json").write_text(json.dumps(saved))
    np.testing.assert_allclose(inference.load(old).image_features(images), teacher, atol=1e-5)
    as_new = inference.load(old, vision_weights="student")
    np.testing.assert_allclose(as_new.image_features(images), student, atol=1e-5)
    # evaluate's --config.vision_weights reaches the model it evaluates.
    config = inference.load(old).config
    config.eval_limit = 24
    config.evals = ("cross_modal",)
    by_teacher = evaluate_checkpoint(old, config)
    config.vision_weights = "student"
    by_student = evaluate_checkpoint(old, config)
    assert by_student == evaluate_checkpoint(run, config) != by_teacher
    with pytest.raises(ConfigError, match="vision_weights='ema'"):
        inference.load(old, vision_weights="ema")


def test_load_a_specific_checkpoint_directory(run):
    oldest = min(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    model = inference.load(run / "checkpoints" / str(oldest))
    latest = inference.load(run)
    leaf = lambda m: np.asarray(jax.tree.leaves(m.student["vision"])[0])
    assert not np.array_equal(leaf(model), leaf(latest))


def test_evaluate_reports_every_evaluator(run):
    config = inference.load(run).config
    config.eval_limit = 24
    results = evaluate_checkpoint(run, config)
    for key in (
        "retrieval_image/image_to_text/R@1",
        "retrieval_volume/text_to_image/R@10",
        "zero_shot_image/mean_auroc",
        "zero_shot_volume/mean_auroc",
        "cross_modal/image_to_volume_mAP",
        "slice_selection/hit_rate",
        "slice_selection/random_hit_rate",
    ):
        assert key in results, key
    assert 0.0 <= results["slice_selection/hit_rate"] <= 1.0
