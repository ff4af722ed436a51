"""Read what a run wrote: its JSON-lines log and its checkpoint's weights."""

import json
from pathlib import Path

from safetensors.torch import load_file


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def weights(checkpoint: Path) -> dict:
    return load_file(str(Path(checkpoint) / "model.safetensors"))
