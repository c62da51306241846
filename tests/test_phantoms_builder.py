"""data_pipelines.builders.phantoms and data_pipelines.prepare: tiny builds in a tmp dir."""

import contextlib
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import prepare, synthetic_phantoms

SIZES = {"image_size": 16, "volume_shape": (8, 16, 16)}
COUNTS = {"num_train": 6, "num_validation": 3, "num_test": 2}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both configs built through the CLI; returns (data_dir, the CLI's stdout)."""
    data_dir = tmp_path_factory.mktemp("data")
    argv = ["phantoms", f"--data_dir={data_dir}", "--image_size=16", "--volume_shape=8,16,16"]
    argv += [f"--{k}={v}" for k, v in COUNTS.items()]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert prepare.run(argv) == 0
    return data_dir, out.getvalue()


def _version_dir(data_dir, config):
    return data_dir / "phantoms" / config / "1.0.0"


def test_array_record_files_and_recorded_sizes(built):
    data_dir, _ = built
    for config, sized in (("xray", {"image_size": 16}), ("ct", {"volume_shape": [8, 16, 16]})):
        path = _version_dir(data_dir, config)
        for split in ("train", "validation", "test"):
            assert (path / f"phantoms-{split}.array_record-00000-of-00001").is_file()
        options = json.loads((path / "metadata.json").read_text())["options"]
        assert options == {**sized, "lesions": "lobar", **COUNTS, "seed": 0}


@pytest.mark.parametrize("split", ["train", "test"])
def test_records_equal_generator_output(built, split):
    data_dir, _ = built
    cfg = synthetic_phantoms.PhantomConfig(image_size=16, volume_shape=(8, 16, 16), split=split)
    xrays = tfds.builder_from_directory(_version_dir(data_dir, "xray")).as_data_source(split)
    cts = tfds.builder_from_directory(_version_dir(data_dir, "ct")).as_data_source(split)
    assert len(xrays) == len(cts) == COUNTS[f"num_{split}"]
    for i in range(len(xrays)):
        want, got = synthetic_phantoms.make_xray(i, cfg), xrays[i]
        assert got["image"].dtype == np.uint8
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["labels"], want["labels"])
        assert got["report"].decode() == want["report"]
        assert got["id"].decode() == f"xray-{split}-{i:06d}"
        want, got = synthetic_phantoms.make_ct(i, cfg), cts[i]
        assert got["volume"].dtype == np.int16
        np.testing.assert_array_equal(got["volume"], want["volume"])
        np.testing.assert_array_equal(got["lesion_slices"], want["lesion_slices"])
        np.testing.assert_array_equal(got["labels"], want["labels"])
        assert got["report"].decode() == want["report"]


def test_cli_summary(built):
    _, out = built
    assert "phantoms/xray (built)" in out and "phantoms/ct (built)" in out
    assert out.count("kept: train 6, validation 3, test 2") == 2
    assert out.count("skipped: none") == 2
    assert "image_size=16" in out and "volume_shape=[8, 16, 16]" in out


def test_ensure_prepared_is_idempotent(built):
    data_dir, _ = built
    shard = _version_dir(data_dir, "ct") / "phantoms-train.array_record-00000-of-00001"
    before = shard.stat().st_mtime_ns
    summaries = prepare.ensure_prepared("phantoms", data_dir, **SIZES)
    assert [s.built for s in summaries] == [False, False]
    assert [s.kept["train"] for s in summaries] == [6, 6]
    assert shard.stat().st_mtime_ns == before


def test_ensure_prepared_refuses_other_sizes(built):
    data_dir, _ = built
    with pytest.raises(prepare.PreparedDataMismatchError, match=r"image_size=16 \(asked 32\)"):
        prepare.ensure_prepared("phantoms/xray", data_dir, image_size=32)
    with pytest.raises(prepare.PreparedDataMismatchError, match="volume_shape"):
        prepare.ensure_prepared("phantoms", data_dir, volume_shape=(8, 32, 32))


def test_unknown_name_lists_valid_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.run(["phantom", f"--data_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert "'phantoms', 'phantoms/xray', 'phantoms/ct'" in capsys.readouterr().err


def test_unknown_option_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not take options"):
        prepare.ensure_prepared("phantoms", tmp_path, crop=3)


def test_builders_do_not_import_jax():
    code = (
        "import sys, data_pipelines.prepare, data_pipelines.builders.phantoms; "
        "assert 'jax' not in sys.modules, 'jax imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lesion_setting_is_built_recorded_and_checked(tmp_path, built):
    """--lesions=small builds the generator's small-lesion phantoms and records it; data of
    another setting is refused, and data built before the option existed counts as lobar."""
    argv = ["phantoms/ct", f"--data_dir={tmp_path}", "--volume_shape=8,16,16", "--lesions=small"]
    argv += ["--num_train=3", "--num_validation=0", "--num_test=0"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert prepare.run(argv) == 0
    path = _version_dir(tmp_path, "ct")
    assert json.loads((path / "metadata.json").read_text())["options"]["lesions"] == "small"
    cfg = synthetic_phantoms.PhantomConfig(volume_shape=(8, 16, 16), lesions="small")
    records = tfds.builder_from_directory(path).as_data_source("train")
    for i in range(3):
        np.testing.assert_array_equal(
            records[i]["volume"], synthetic_phantoms.make_ct(i, cfg)["volume"]
        )
    with pytest.raises(prepare.PreparedDataMismatchError, match=r"lesions=small \(asked lobar\)"):
        prepare.ensure_prepared("phantoms/ct", tmp_path, lesions="lobar")

    data_dir, _ = built
    metadata = json.loads((_version_dir(data_dir, "ct") / "metadata.json").read_text())
    assert metadata["options"]["lesions"] == "lobar"
    del metadata["options"]["lesions"]  # as written before the option existed
    older = tmp_path / "older"
    shutil.copytree(_version_dir(data_dir, "ct"), _version_dir(older, "ct"))
    (_version_dir(older, "ct") / "metadata.json").write_text(json.dumps(metadata))
    prepare.check_prepared("phantoms/ct", older, lesions="lobar")
    with pytest.raises(prepare.PreparedDataMismatchError, match=r"lesions=lobar \(asked small\)"):
        prepare.check_prepared("phantoms/ct", older, lesions="small")


def test_a_run_refuses_phantoms_of_another_lesion_setting(built):
    """A run given a data_dir of lobar phantoms but asking for small lesions stops before
    training, naming the option; with data_dir empty it builds into a folder of its own."""
    from configs.pretrain import get_config
    from unimedi_jax.trainers.pretraining import demo_data_dir, prepare_demo_data

    data_dir, _ = built
    config = get_config("tiny")
    config.data.update(data_dir=str(data_dir), phantom_lesions="small")
    with pytest.raises(prepare.PreparedDataMismatchError, match=r"lesions=lobar \(asked small\)"):
        prepare_demo_data(config, data_dir)
    assert demo_data_dir(config, data_dir) == data_dir / "data_small_lesions"
    config.data.phantom_lesions = "lobar"
    prepare_demo_data(config, data_dir)  # the same setting: accepted
    assert demo_data_dir(config, data_dir) == data_dir / "data"
