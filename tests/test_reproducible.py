"""Two fresh from-scratch runs of one config and seed are the same run, bit for bit (CPU, float32).

Each run builds its own WordPiece vocabulary from the reports, in its own process with its own
string-hash seed (Python's, and Rust's inside ``tokenizers``); both must write the same vocabulary,
log the same metrics and end in the same weights. The runs share the prepared phantoms and a
compilation cache, so the second one does not compile; about a minute on a loaded 2-core machine.
"""

from tests.tiny_runs import subprocess_env, tiny_run_config
from unimedi_jax.diagnostics.resume_soak import compare_runs, run_to_end

ARGS = [
    "--config=configs/pretrain.py:tiny",
    "--config.total_steps=3",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=3",
    "--config.eval_every_steps=0",
]
TIMEOUT_S = 600


def test_two_fresh_runs_build_the_same_vocabulary_and_log_the_same_losses(tmp_path):
    data_dir = tmp_path / "data"
    tiny_run_config(data_dir)  # prepares the phantoms both runs read
    env = subprocess_env()
    runs = [tmp_path / "run_a", tmp_path / "run_b"]
    for workdir, hash_seed in zip(runs, ("1", "2"), strict=True):
        args = [*ARGS, f"--config.data.data_dir={data_dir}"]
        run_to_end(workdir, args, {**env, "PYTHONHASHSEED": hash_seed}, TIMEOUT_S)

    vocabularies = [
        {f.name: f.read_bytes() for f in sorted((workdir / "tokenizer").iterdir())}
        for workdir in runs
    ]
    assert vocabularies[0] == vocabularies[1]
    assert compare_runs(runs[0], runs[1]) == []
