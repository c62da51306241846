"""Evaluators as configured units, and in-loop evaluation on the sharded train state."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from configs.pretrain import get_config
from data_pipelines.prepare import ensure_prepared
from tests.fake_devices import fake_device_flags
from unimedi_jax.config import evaluator_settings
from unimedi_jax.config.upgrade import upgrade_config
from unimedi_jax.core.errors import ConfigError
from unimedi_jax.core.overrides import apply_overrides
from unimedi_jax.evaluation import evaluators

ROOT = Path(__file__).resolve().parents[1]


def _summary(config) -> list[tuple]:
    return [(e.name, e.every_steps, e.split, e.limit) for e in evaluators.from_config(config)]


def test_config_names_every_registered_evaluator():
    assert tuple(evaluators.EVALUATORS) == evaluator_settings.NAMES
    assert set(get_config().eval_settings) == set(evaluator_settings.NAMES)


def test_each_evaluator_takes_the_defaults_unless_its_settings_replace_them():
    config = get_config("demo")
    assert _summary(config) == [(name, 500, "test", 200) for name in config.evals]
    config.eval_settings.linear_probe.update(every_steps=1000, split="validation", limit=50)
    config.eval_settings.retrieval.every_steps = 0
    found = {e.name: e for e in evaluators.from_config(config)}
    assert (found["linear_probe"].every_steps, found["linear_probe"].split) == (1000, "validation")
    assert found["linear_probe"].limit == 50
    assert (found["zero_shot"].every_steps, found["zero_shot"].limit) == (500, 200)
    # The schedule: every N steps and at the last one; every_steps=0 never in the loop.
    steps = range(1, 1201)
    assert [s for s in steps if found["zero_shot"].due(s, 1200)] == [500, 1000, 1200]
    assert [s for s in steps if found["linear_probe"].due(s, 1200)] == [1000, 1200]
    assert not any(found["retrieval"].due(s, 1200) for s in steps)


def test_readme_overrides_of_the_eval_fields():
    """docs/outputs.md's evaluate overrides, applied as the command applies them to a saved
    config."""
    saved = get_config("tiny")
    readme = [
        "--config.eval_split=test",
        "--config.eval_limit=100",
        "--config.evals=('retrieval',)",
    ]
    config = apply_overrides(saved, readme)
    assert _summary(config) == [("retrieval", saved.eval_every_steps, "test", 100)]
    per_evaluator = [
        "--config.evals=('retrieval','linear_probe')",
        "--config.eval_settings.linear_probe.every_steps=2000",
        "--config.eval_settings.linear_probe.limit=100",
    ]
    config = apply_overrides(saved, per_evaluator)
    assert _summary(config) == [
        ("retrieval", saved.eval_every_steps, saved.eval_split, saved.eval_limit),
        ("linear_probe", 2000, saved.eval_split, 100),
    ]


def test_unknown_evaluator_is_a_config_error_listing_the_valid_names():
    config = get_config("tiny")
    config.evals = ("retrieval", "retreival")
    with pytest.raises(ConfigError, match=r"unknown evaluators \['retreival'\]; valid: \[") as err:
        evaluators.from_config(config)
    for name in evaluator_settings.NAMES:
        assert name in str(err.value)


def test_a_config_saved_before_per_evaluator_settings_evaluates_as_it_did():
    current = get_config("demo")
    old = ml_collections.ConfigDict(json.loads(current.to_json()))
    del old["eval_settings"]
    old.eval_every_steps, old.eval_split, old.eval_limit = 300, "validation", 40
    upgraded = upgrade_config(old)
    assert _summary(upgraded) == [(name, 300, "validation", 40) for name in current.evals]


SHARDED = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from configs.pretrain import get_config
    from unimedi_jax.core import sharding
    from unimedi_jax.text_tower.run_setup import prepare_text_tower
    from unimedi_jax.config import evaluator_settings
    from unimedi_jax.evaluation import evaluators, predict
    from unimedi_jax.inference import UniMedIInference
    from unimedi_jax.trainers import pretraining

    data_dir, workdir = sys.argv[1], Path(sys.argv[2])
    config = get_config("tiny")
    config.data.data_dir = data_dir
    config.mesh.preset = "fsdp"
    config.update(evals=evaluator_settings.NAMES, eval_limit=12, probe_train_limit=24)
    text = prepare_text_tower(config, workdir)
    mesh = sharding.mesh_from_config(config.mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    trainer = pretraining.build_trainer(config, text, mesh, total_steps=10, warmup_steps=2)
    state = trainer.state

    # What the predict functions receive: the state's own (sharded) arrays, nothing gathered.
    params_seen = []
    def spy(fn):
        def call(params, *args, **kwargs):
            params_seen.append(params)
            return fn(params, *args, **kwargs)
        return call
    original = predict._jitted
    patched = predict._Jitted(*(spy(fn) for fn in original(trainer.model, mesh)))
    predict._jitted = lambda model, m: patched if m is mesh else original(model, m)
    def refuse(*args, **kwargs):
        raise AssertionError("in-loop evaluation gathered the parameters")
    multihost_utils.process_allgather = refuse

    due = evaluators.from_config(config)
    sharded = pretraining.evaluate_state(config, due, trainer, state, text, mesh)

    state_leaves = jax.tree.leaves((state.params, state.teacher))
    state_ids = {id(leaf) for leaf in state_leaves}
    assert len(params_seen) > 10
    assert all(id(leaf) in state_ids for seen in params_seen for leaf in jax.tree.leaves(seen))
    split = [leaf for leaf in state_leaves if not leaf.sharding.is_fully_replicated]
    assert len(split) > len(state_leaves) // 2, "the tiny model should be sharded by FSDP"

    # The reference: the public inference path on one device, on gathered host copies.
    params, teacher = jax.device_get((state.params, state.teacher))
    one = UniMedIInference(config, trainer.model, params, teacher, text.tokenizer)
    assert one.predictor.mesh.size == 1
    single = evaluators.run_evaluators(one, config, due)
    print("RESULT " + json.dumps({"sharded": sharded, "single": single}))
    """
)


def test_in_loop_evaluation_on_the_fsdp_sharded_state_matches_one_device_inference(tmp_path):
    data_dir = tmp_path / "data"
    config = get_config("tiny")
    ensure_prepared(
        "phantoms",
        data_dir,
        image_size=config.model.image_size[0],
        volume_shape=tuple(config.model.volume_size),
        num_train=24,
        num_validation=12,
        num_test=12,
    )
    env = {
        **os.environ,
        "XLA_FLAGS": fake_device_flags(8),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED, str(data_dir), str(tmp_path / "run")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    found = json.loads(line[len("RESULT ") :])
    sharded, single = found["sharded"], found["single"]
    assert sorted(sharded) == sorted(single)
    for prefix in ("retrieval_", "zero_shot_", "cross_modal/", "slice_selection/", "linear_probe_"):
        assert any(k.startswith(prefix) for k in sharded), prefix
    for key, value in single.items():
        assert sharded[key] == pytest.approx(value, abs=1e-4, nan_ok=True), key


def test_slice_hit_rate_per_finding_over_the_volumes_with_that_finding_alone():
    """Hand-computed: 4 phantom volumes of depth 4, k = 2 selected slices each."""
    findings = list(evaluators.zero_shot_prompts.label_names("phantoms"))
    labels = np.zeros((4, len(findings)), np.float32)
    nodule, effusion = findings.index("nodule"), findings.index("pleural_effusion_left")
    labels[0, nodule] = labels[1, nodule] = 1.0  # nodule alone
    labels[2, [nodule, effusion]] = 1.0  # two findings: counts for neither finding alone
    labels[3, effusion] = 1.0  # effusion alone
    lesion = np.array(
        [[1, 0, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1]], bool
    )  # nodules in one slice, the effusion in three
    selected = np.array([[0, 1], [0, 1], [0, 1], [2, 3]])

    class Selecting:
        def select_slices(self, arrays):
            return selected, None

    volume = evaluators.Modality(None, labels, [], None, None, lesion)
    data = evaluators.EvalSet("phantoms", {"volume": volume}, {"volume": "phantoms"}, None, 4)
    found = evaluators.slice_hit_rate(Selecting(), data)
    # All 4: hits 1/2, 0/2, 2/2, 2/2 -> 0.625; chance 1/4, 1/4, 4/4, 3/4 -> 0.5625.
    assert found["slice_selection/hit_rate"] == pytest.approx(0.625)
    assert found["slice_selection/random_hit_rate"] == pytest.approx(0.5625)
    assert found["slice_selection/hit_rate/nodule"] == pytest.approx(0.25)  # volumes 0 and 1
    assert found["slice_selection/random_hit_rate/nodule"] == pytest.approx(0.25)
    assert found["slice_selection/hit_rate/pleural_effusion_left"] == pytest.approx(1.0)
    assert found["slice_selection/random_hit_rate/pleural_effusion_left"] == pytest.approx(0.75)
    assert not any(name.endswith("/cardiomegaly") for name in found)  # no volume has it alone


def test_slice_choice_embeds_the_volumes_with_no_random_and_lesion_slices():
    """A model whose CT embedding grows with the lesion slices it is given: the oracle's slices
    separate the nodules perfectly, the volume alone not at all, random ones in between."""
    from sklearn.metrics import roc_auc_score

    from unimedi_jax.method import selection

    findings = list(evaluators.zero_shot_prompts.label_names("phantoms"))
    labels = np.zeros((6, len(findings)), np.float32)
    labels[:3, findings.index("nodule")] = 1.0
    lesion = np.zeros((6, 4), bool)
    lesion[0, 0] = lesion[1, [1, 2]] = lesion[2, 3] = True
    given = []

    class Fake:
        config = ml_collections.ConfigDict({"selection": {"k": 2}})

        def embed_volumes(self, arrays, slice_indices):
            given.append(np.asarray(slice_indices))
            hits = np.array([lesion[n, i].sum() for n, i in enumerate(slice_indices)], float)
            return np.stack([hits, np.ones_like(hits)], axis=1)

        def embed_texts(self, texts):
            return np.array([[1.0, 0.0] if t == "Pulmonary nodule." else [0.0, 1.0] for t in texts])

    volume = evaluators.Modality(np.zeros((6, 4, 2, 2)), labels, [], None, None, lesion)
    data = evaluators.EvalSet("phantoms", {"volume": volume}, {"volume": "phantoms"}, None, 6)
    found = evaluators.slice_choice(Fake(), data)
    none, random, oracle = given
    assert none.shape == (6, 0)
    assert oracle.shape == random.shape == (6, 2)
    assert found["slice_choice/none/auroc/nodule"] == pytest.approx(0.5)
    assert found["slice_choice/oracle/auroc/nodule"] == pytest.approx(1.0)
    hits = np.array([lesion[n, i].sum() for n, i in enumerate(random)])
    truth = labels[:, findings.index("nodule")]
    assert found["slice_choice/random/auroc/nodule"] == pytest.approx(roc_auc_score(truth, hits))
    np.testing.assert_array_equal(
        random, selection.random_slices(evaluators.jax.random.key(0), 6, 4, 2)
    )
