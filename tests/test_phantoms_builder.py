"""data_pipelines.builders.phantoms and data_pipelines.prepare: tiny builds in a tmp dir."""

import contextlib
import io
import json
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
        assert options == {**sized, **COUNTS, "seed": 0}


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
