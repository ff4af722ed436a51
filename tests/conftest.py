import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from fdivctl import tiny  # noqa: E402


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
