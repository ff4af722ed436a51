import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from cli_runner import run_cli  # noqa: E402

from fdivctl import tiny  # noqa: E402
from fdivctl.demo import pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tiny.train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tokenizer_dir):
    """A random-init Qwen2 teacher directory (hidden 128, 2 layers) with its tokenizer."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("teacher")
    tiny.make_model(path, AutoTokenizer.from_pretrained(tokenizer_dir), seed=1)
    return path


@pytest.fixture(scope="session")
def student(tmp_path_factory, tokenizer_dir):
    """A one-layer random Qwen2 student (seed 5) sharing the teacher's tokenizer; modules may override it."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("student")
    tiny.make_model(path, AutoTokenizer.from_pretrained(tokenizer_dir), seed=5, layers=1)
    return path


def with_chat_template(model: Path, out: Path, template: str) -> Path:
    """A copy of the model directory ``model`` at ``out`` whose tokenizer has ``template`` as its chat template."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    return out


def write_sequences(path: Path, vocab: int, n: int, prompt_len: int, completion_len: int, seed: int,
                    **columns) -> Path:
    """A sequences Parquet of ``n`` rows of random token ids (ids ≥ 3: no special tokens), plus ``columns``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = pa.list_(pa.int32())
    table = pa.table({
        "prompt_id": [f"p{i}" for i in range(n)],
        "sample_idx": pa.array([0] * n, pa.int64()),
        "prompt_token_ids": pa.array(torch.randint(3, vocab, (n, prompt_len), generator=g).tolist(), ids),
        "completion_token_ids": pa.array(torch.randint(3, vocab, (n, completion_len), generator=g).tolist(), ids),
        **columns,
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# -- the demo task's RL fixtures (test_train.py, test_train_methods.py) ------------------------------------------
@pytest.fixture(scope="session")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    pipeline.write_data(root / "data", sft_per_prompt=16, seed=0)
    run_cli("demo", "init", root / "data" / "tokenizer", root / "random", "--hidden", 64, "--layers", 2, check=True)
    run_cli("train", root / "random", root / "sft", "--algo", "sft", "--data", root / "data" / "sft.parquet",
            "--lr", "3e-3", "--batch-size", 32, "--epochs", 2, "--device", "cpu", check=True)
    return root


@pytest.fixture(scope="session")
def scored_rollouts(task, tmp_path_factory):
    """Scored rollouts of the SFT policy (4 per prompt) for the staged KDRL runs."""
    root = tmp_path_factory.mktemp("kdrl")
    run_cli("rollout", task / "sft", task / "data" / "prompts.parquet", root / "r.parquet", "--n", 4, "--seed", 5,
            "--max-new-tokens", 10, "--device", "cpu", check=True)
    run_cli("score", root / "r.parquet", root / "r.scored.parquet", "--verifier", "regex", "--pattern",
            r"^\s*[1-3]\+", "--workers", 1, check=True)
    return root / "r.scored.parquet"
