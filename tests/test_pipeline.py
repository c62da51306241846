"""data_pipelines.pipeline on tiny phantoms: batches, determinism, sharding, state, skips."""

import json

import numpy as np
import pytest

from configs.pretrain import get_config
from data_pipelines import eval_split, finetune_epochs, prepare, sources, train_stream, transforms
from tests.damaged_records import damage_train_records
from unimedi_jax.text_tower.tokenizer import train_wordpiece_tokenizer

N_TRAIN, N_TEST = 40, 6
STORED, CROP, VOLUME = 24, 16, (8, 16, 16)
MAX_LENGTH = 96  # long enough that no report is truncated: tokens identify the report


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    prepare.ensure_prepared(
        "phantoms",
        path,
        image_size=STORED,
        volume_shape=VOLUME,
        num_train=N_TRAIN,
        num_validation=0,
        num_test=N_TEST,
    )
    return path


@pytest.fixture(scope="module")
def tokenizer(data_dir, tmp_path_factory):
    texts = sources.report_texts(_config(data_dir))
    return train_wordpiece_tokenizer(texts, 300, tmp_path_factory.mktemp("tokenizer"))


def _config(root, **data):
    c = get_config("tiny")
    c.model.image_size = (CROP, CROP)
    c.model.volume_size = VOLUME
    c.text.max_length = MAX_LENGTH
    c.batch.size_2d, c.batch.size_3d = 8, 4
    c.data.update({"data_dir": str(root), "worker_count": 0, **data})
    return c


def _take(stream, n):
    batches = [next(stream) for _ in range(n)]
    stream.close()
    return batches


def _records(data_dir, config, split="train"):
    return sources.open_source(f"phantoms/{config}", data_dir, split=split).open()


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_keys_shapes_dtypes_ranges(data_dir, tokenizer):
    stream = train_stream.TrainStream(_config(data_dir), tokenizer)
    assert stream.steps_per_epoch == N_TRAIN // 8
    (batch,) = _take(stream, 1)
    expected = {
        "image": ((8, CROP, CROP), np.float32),
        "image_text_ids": ((8, MAX_LENGTH), np.int32),
        "image_text_mask": ((8, MAX_LENGTH), np.int32),
        "volume": ((4, *VOLUME), np.float32),
        "volume_text_ids": ((4, MAX_LENGTH), np.int32),
        "volume_text_mask": ((4, MAX_LENGTH), np.int32),
    }
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    for key in ("image", "volume"):
        assert batch[key].min() >= 0.0 and batch[key].max() <= 1.0 and batch[key].std() > 0
    assert set(np.unique(batch["image_text_mask"])) == {0, 1}
    assert stream.skipped == {}


def test_single_modality_stream(data_dir, tokenizer):
    stream = train_stream.TrainStream(_config(data_dir, sources_2d=""), tokenizer)
    assert stream.steps_per_epoch == N_TRAIN // 4
    (batch,) = _take(stream, 1)
    assert set(batch) == {"volume", "volume_text_ids", "volume_text_mask"}


def test_rows_are_stored_records_with_their_reports(data_dir, tokenizer):
    """Each 3D row is a windowed stored volume; each 2D row a crop of the stored image whose
    report tokenises to the row's ids. One epoch uses every record once."""
    config = _config(data_dir)
    volumes, images = _records(data_dir, "ct"), _records(data_dir, "xray")
    window = tuple(config.data.hu_window)
    stored_volumes = [transforms.transform_3d(volumes[i]["volume"], window) for i in range(N_TRAIN)]
    encode = lambda r: transforms.tokenize([r["report"].decode()], tokenizer, MAX_LENGTH, "x")
    image_ids = [encode(images[i])["x_text_ids"][0] for i in range(N_TRAIN)]
    seen_volumes, seen_images = [], []
    for batch in _take(train_stream.TrainStream(config, tokenizer), N_TRAIN // 8):
        for row, ids in enumerate(batch["volume_text_ids"]):
            (match,) = [
                i for i, v in enumerate(stored_volumes) if np.array_equal(v, batch["volume"][row])
            ]
            np.testing.assert_array_equal(ids, encode(volumes[match])["x_text_ids"][0])
            seen_volumes.append(match)
        for row, ids in enumerate(batch["image_text_ids"]):
            (match,) = [i for i, want in enumerate(image_ids) if np.array_equal(want, ids)]
            stored = images[match]["image"].astype(np.float32) / 255.0
            windows = np.lib.stride_tricks.sliding_window_view(stored, (CROP, CROP))
            assert (np.abs(windows - batch["image"][row]).max(axis=(2, 3)) < 1e-6).any()
            seen_images.append(match)
    assert sorted(seen_images) == list(range(N_TRAIN))
    assert len(set(seen_volumes)) == len(seen_volumes) == N_TRAIN // 2


def test_oracle_selection_brings_each_volumes_lesion_slices(data_dir, tokenizer):
    config = _config(data_dir)
    config.selection.mode = "oracle"
    volumes = _records(data_dir, "ct")
    window = tuple(config.data.hu_window)
    stored = [transforms.transform_3d(volumes[i]["volume"], window) for i in range(N_TRAIN)]
    (batch,) = _take(train_stream.TrainStream(config, tokenizer), 1)
    assert batch["lesion_slices"].shape == (4, VOLUME[0])
    assert batch["lesion_slices"].dtype == np.bool_
    for volume, lesion in zip(batch["volume"], batch["lesion_slices"], strict=True):
        (match,) = [i for i, v in enumerate(stored) if np.array_equal(v, volume)]
        np.testing.assert_array_equal(lesion, volumes[match]["lesion_slices"])


def test_oracle_selection_refuses_volumes_without_lesion_slices(data_dir):
    config = _config(data_dir)
    config.selection.mode = "oracle"
    plain = sources.Source(
        "ct_rate/default", data_dir, "train", 8, VOLUME, np.dtype(np.int16), 1.0, ("volume",)
    )
    plan = train_stream._ModalityPlan("3d", (plain,), 4, 4)
    with pytest.raises(sources.DataConfigError, match=r"selection.mode=oracle.*ct_rate/default"):
        train_stream._extra_fields(config, plan)
    config.selection.mode = "random"
    assert train_stream._extra_fields(config, plan) == ()


def test_new_order_each_epoch(data_dir, tokenizer):
    config = _config(data_dir, sources_3d="")
    spe = N_TRAIN // 8
    batches = _take(train_stream.TrainStream(config, tokenizer), 2 * spe)
    epochs = [
        np.concatenate([b["image_text_ids"] for b in batches[e * spe : (e + 1) * spe]])
        for e in (0, 1)
    ]
    key = lambda ids: sorted(map(bytes, ids))
    assert key(epochs[0]) == key(epochs[1])  # the same records ...
    assert not np.array_equal(epochs[0], epochs[1])  # ... in another order


def test_seed_changes_the_order(data_dir, tokenizer):
    a = _take(train_stream.TrainStream(_config(data_dir), tokenizer), 1)[0]
    config = _config(data_dir)
    config.seed = 1
    b = _take(train_stream.TrainStream(config, tokenizer), 1)[0]
    assert not np.array_equal(a["volume"], b["volume"])


def test_same_batches_with_worker_processes(data_dir, tokenizer):
    in_process = _take(train_stream.TrainStream(_config(data_dir), tokenizer), 3)
    workers = _take(train_stream.TrainStream(_config(data_dir, worker_count=2), tokenizer), 3)
    for a, b in zip(in_process, workers, strict=True):
        _assert_batches_equal(a, b)
        assert type(b["image"]) is np.ndarray


def test_global_batch_does_not_depend_on_process_count(data_dir, tokenizer):
    config = _config(data_dir)
    whole = _take(train_stream.TrainStream(config, tokenizer), 6)
    parts = [_take(train_stream.TrainStream(config, tokenizer, p, 2), 6) for p in (0, 1)]
    for step, batch in enumerate(whole):
        joined = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in batch}
        _assert_batches_equal(batch, joined)
        assert parts[0][step]["image"].shape[0] == 4 and parts[0][step]["volume"].shape[0] == 2


def test_state_round_trip(data_dir, tokenizer):
    config = _config(data_dir)
    stream = train_stream.TrainStream(config, tokenizer)
    _take(stream, 3)
    state = json.loads(json.dumps(stream.get_state()))
    expected = [next(stream) for _ in range(3)]
    stream.close()
    resumed = train_stream.TrainStream(config, tokenizer)
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 3), strict=True):
        _assert_batches_equal(a, b)
    assert resumed.get_state()["step"] == 6


def test_corrupt_record_is_replaced_and_counted(data_dir, tokenizer, tmp_path):
    damage = {5: lambda record, features: b"\x0a\xff damaged"}
    copy = damage_train_records(data_dir, tmp_path / "data", "phantoms/xray", damage)
    stream = train_stream.TrainStream(_config(copy, sources_3d=""), tokenizer)
    batches = _take(stream, N_TRAIN // 8)  # one epoch: every record is drawn once
    assert all(b["image"].shape == (8, CROP, CROP) for b in batches)
    assert stream.skipped == {f"phantoms/xray: {train_stream.UNDECODABLE}": 1}
    assert stream.get_state()["skipped"] == dict(stream.skipped)


def test_mixed_sources(data_dir, tokenizer):
    config = _config(data_dir, sources_2d="phantoms:3, phantoms/xray:1", sources_3d="")
    stream = train_stream.TrainStream(config, tokenizer)
    assert stream.steps_per_epoch == 2 * N_TRAIN // 8
    a = _take(stream, 2)
    b = _take(train_stream.TrainStream(config, tokenizer), 2)
    for x, y in zip(a, b, strict=True):
        _assert_batches_equal(x, y)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"volume_size": (8, 32, 32)}, r"config.model.volume_size=\(8, 32, 32\)"),
        ({"image_size": (32, 32)}, r"config.model.image_size=\(32, 32\) is larger"),
        ({"image_size": (16, 8)}, "square"),
    ],
)
def test_size_mismatch_is_reported(data_dir, tokenizer, change, message):
    config = _config(data_dir)
    config.model.update(change)
    with pytest.raises(sources.DataConfigError, match=message):
        train_stream.TrainStream(config, tokenizer)


@pytest.mark.parametrize(
    ("data", "batch", "process_count", "message"),
    [
        ({"data_dir": ""}, {}, 1, "config.data.data_dir is empty"),
        ({"sources_2d": "mimic"}, {}, 1, "valid names"),
        ({"sources_2d": "phantoms/ct"}, {}, 1, "holds no 2d data"),
        ({"sources_3d": "phantoms/xray:0"}, {}, 1, "positive weight"),
        ({}, {"size_2d": 8}, 3, "divisible"),
        ({}, {"size_3d": 64}, 1, "fewer than one global batch"),
        ({"sources_2d": "", "sources_3d": ""}, {}, 1, "both empty"),
    ],
)
def test_config_errors(data_dir, tokenizer, data, batch, process_count, message):
    config = _config(data_dir, **data)
    config.batch.update(batch)
    with pytest.raises(ValueError, match=message):
        train_stream.TrainStream(config, tokenizer, 0, process_count)


def test_missing_dataset_says_how_to_prepare(tmp_path, tokenizer):
    with pytest.raises(
        sources.DataConfigError, match=r"python -m data_pipelines\.prepare phantoms"
    ):
        train_stream.TrainStream(_config(tmp_path), tokenizer)


def test_report_texts(data_dir):
    texts = sources.report_texts(_config(data_dir))
    xrays = _records(data_dir, "xray")
    assert len(texts) == 2 * N_TRAIN and texts[0] == xrays[0]["report"].decode()
    assert len(sources.report_texts(_config(data_dir), limit=5)) == 10


def test_eval_batches_in_order_centre_cropped(data_dir):
    config = _config(data_dir)
    batches = list(eval_split.eval_batches(config, "phantoms", "2d", "test", batch_size=4))
    assert [len(b["id"]) for b in batches] == [4, 2]
    records = _records(data_dir, "xray", "test")
    margin = (STORED - CROP) // 2
    for i, image in enumerate(np.concatenate([b["image"] for b in batches])):
        stored = records[i]["image"][margin : margin + CROP, margin : margin + CROP]
        np.testing.assert_allclose(image, stored / 255.0, atol=1e-6)
    (volumes,) = list(eval_split.eval_batches(config, "phantoms", "3d", "test", batch_size=8))
    assert volumes["volume"].shape == (N_TEST, *VOLUME)
    assert volumes["lesion_slices"].shape == (N_TEST, VOLUME[0])
    assert volumes["labels"].shape == (N_TEST, 6) and len(volumes["report"]) == N_TEST
    assert volumes["id"][0] == "ct-test-000000"


# --------------------------------------------------------------------------------- fine-tuning


def _labelled(data_dir, label_key="id", seed=0, epoch=0, threads=1, flip_axes=(0, 2)):
    source = sources.open_source("phantoms/ct", data_dir, split="train")
    window = (-1000.0, 1000.0)
    epoch_batches = finetune_epochs.labelled_epoch(
        source, label_key, 8, seed, epoch, window=window, flip_axes=flip_axes, threads=threads
    )
    return list(epoch_batches)


def test_labelled_epoch_rows_are_their_records_windowed_and_flipped(data_dir):
    """Each row is its own record's windowed volume, mirrored along some of the flip axes; every
    record comes once per epoch, and each flip axis is used for about half of them."""
    records = _records(data_dir, "ct")
    by_id = {records[i]["id"]: records[i] for i in range(N_TRAIN)}
    batches = _labelled(data_dir)
    assert len(batches) == N_TRAIN // 8
    seen, flipped = [], {0: 0, 2: 0}
    for batch in batches:
        assert batch.keys() == {"volume", "id"}
        assert batch["volume"].shape == (8, *VOLUME) and batch["volume"].dtype == np.float32
        for volume, record_id in zip(batch["volume"], batch["id"], strict=True):
            plain = np.clip((by_id[record_id]["volume"].astype(np.float64) + 1000) / 2000, 0, 1)
            combos = [(), (0,), (2,), (0, 2)]
            (axes,) = [a for a in combos if np.allclose(np.flip(plain, a), volume, atol=1e-6)]
            for axis in axes:
                flipped[axis] += 1
            seen.append(record_id)
    assert sorted(seen) == sorted(by_id)
    assert all(N_TRAIN // 4 <= n <= 3 * N_TRAIN // 4 for n in flipped.values()), flipped


def test_labelled_epoch_is_deterministic_whatever_the_threads(data_dir):
    one = _labelled(data_dir)
    for other in (_labelled(data_dir), _labelled(data_dir, threads=4)):
        for a, b in zip(one, other, strict=True):
            _assert_batches_equal(a, b)
    next_epoch = _labelled(data_dir, epoch=1)
    assert not np.array_equal(one[0]["id"], next_epoch[0]["id"])


def test_labelled_epoch_keeps_multi_hot_labels_with_their_volumes(data_dir):
    records = _records(data_dir, "ct")
    labels_of = {
        transforms.transform_3d(records[i]["volume"]).tobytes(): records[i]["labels"]
        for i in range(N_TRAIN)
    }
    for batch in _labelled(data_dir, label_key="labels", flip_axes=()):
        assert batch["labels"].shape == (8, *records[0]["labels"].shape)
        for volume, labels in zip(batch["volume"], batch["labels"], strict=True):
            np.testing.assert_array_equal(labels, labels_of[volume.tobytes()])


def test_open_for_model_names_the_checkpoint_whose_sizes_are_fixed(data_dir):
    """A trained model's sizes cannot change: the message names its checkpoint, offers only
    another preparation, and the not-prepared message says how to prepare."""
    with pytest.raises(sources.DataConfigError) as info:
        sources.open_for_model(
            "phantoms/ct", data_dir, "3d", "train", (CROP, CROP), (8, 8, 8), checkpoint="/r/7"
        )
    message = str(info.value)
    assert message.startswith("model.volume_size=(8, 8, 8) of checkpoint /r/7 (its config.json)")
    assert "--volume_shape=8,8,8 into another data_dir" in message
    assert "config.model" not in message
    with pytest.raises(sources.DataConfigError, match=r"image_size=\(32, 32\) of checkpoint"):
        sources.open_for_model(
            "phantoms/xray", data_dir, "2d", "test", (32, 32), VOLUME, checkpoint="c"
        )
    source = sources.open_for_model("phantoms/xray", data_dir, "2d", "test", (CROP, CROP), VOLUME)
    assert source.size == N_TEST and source.array_shape == (STORED, STORED)
