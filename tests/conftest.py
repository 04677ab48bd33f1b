"""Shared test helpers: where ../shared/data is, SQuAD dev pairs, and one assert_close that reports."""
import gzip
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir():
    for cand in (os.environ.get("TINYQA_SHARED"), ROOT.parent / "shared", ROOT / "shared"):
        if cand and (Path(cand) / "data").is_dir():
            return Path(cand) / "data"
        if cand and Path(cand).name == "data" and Path(cand).is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def shared():
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared data not found: set TINYQA_SHARED to the folder holding data/ "
                    "(roberta-tokenizer, configs, mrqa)")
    return d


@pytest.fixture(scope="session")
def squad_path(shared):
    return shared / "mrqa" / "SQuAD-dev-v1.1.jsonl.gz"


@pytest.fixture(scope="session")
def squad_pairs(squad_path):
    """(question, context) for every SQuAD dev question, read with plain json (independent of tinyqa)."""
    pairs = []
    with gzip.open(squad_path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "header" in row:
                continue
            pairs += [(qa["question"], row["context"]) for qa in row["qas"]]
    return pairs


@pytest.fixture(scope="session")
def tokenizer_dir(shared):
    return shared / "roberta-tokenizer"


def assert_close(actual, expected, atol, what=""):
    """torch.testing-style check that always reports the max and mean absolute difference."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    assert diff.max().item() <= atol, (f"{what}: max abs diff {diff.max().item():.3g} > {atol} "
                                       f"(mean {diff.mean().item():.3g})")
    return diff.max().item()
