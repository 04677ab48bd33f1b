"""The command lines' shared parts (tinyqa/cli.py): every flag of every script explained, one name per
setting, the stage's own defaults and flags, and the flags a command line named."""
import argparse
import importlib.util

import pytest
from conftest import ROOT

from tinyqa import cli
from tinyqa.__main__ import build_parser as main_parser
from tinyqa.errors import TinyQAError


def _evaluate_parser():
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def parsers():
    main = main_parser()
    subs = next(a for a in main._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {"train_distill.py": cli.distill_parser("prediction"),
            "train_distill.py --stage intermediate": cli.distill_parser("intermediate"),
            "train_finetune.py": cli.finetune_parser(), "evaluate.py": _evaluate_parser(),
            **{f"python -m tinyqa {name}": p for name, p in subs.items() if name != "demo"}}


@pytest.mark.parametrize("name", list(parsers()))
def test_every_flag_has_help(name):
    p = parsers()[name]
    unexplained = [a.option_strings for a in p._actions if a.option_strings and not (a.help or "").strip()]
    assert not unexplained, f"{name}: flags without help: {unexplained}"
    assert "--max-query-length" not in p._option_string_actions and "--allow-null" not in p._option_string_actions


def test_one_name_per_setting_across_the_command_lines():
    """The window and null-answer settings have the pipeline's names wherever they appear."""
    for name, p in parsers().items():
        flags = set(p._option_string_actions)
        if "--max-seq-len" in flags:
            assert {"--doc-stride", "--max-question-len"} <= flags, name
    for name in ("evaluate.py", "python -m tinyqa answer", "python -m tinyqa serve"):
        assert "--handle-impossible-answer" in parsers()[name]._option_string_actions


def test_each_stage_has_its_defaults_and_only_its_flags():
    a = cli.distill_args(["--stage", "intermediate"])
    assert (a.teacher, a.lr, a.batch_size, a.out) == ("roberta-base-squad2", 5e-5, 32, "runs/step1")
    assert not hasattr(a, "temperature")
    b = cli.distill_args([])
    assert (b.teacher, b.lr, b.batch_size, b.temperature) == ("roberta-large-mrqa", 3e-5, 96, 1.5)
    assert not hasattr(b, "layer_map")
    with pytest.raises(TinyQAError, match="--layer-map is read by --stage intermediate"):
        cli.distill_args(["--layer-map=2,4"])
    with pytest.raises(SystemExit):
        cli.distill_args(["--no-such-flag"])


def test_given_flags_are_the_ones_named():
    a = cli.finetune_args(["--lr", "1e-4", "--epochs=2", "--quiet", "--out", "x"])
    assert a.given == ["epochs", "lr", "out", "quiet"] and not a.distill
    assert cli.distill_args(["--lr", "3e-5"]).given == ["lr"]  # named, even at its default


def test_args_json_written_before_the_rename_reads_the_same(tmp_path):
    """Checkpoints from before keep their window settings: args.json's max_query_length is max_question_len."""
    import json

    from tinyqa.infer import featurizer_config_of
    from tinyqa.runs import read_args
    (tmp_path / "args.json").write_text(json.dumps({"max_seq_len": 128, "doc_stride": 32, "max_query_length": 20}))
    assert featurizer_config_of(str(tmp_path)).max_question_len == 20
    assert read_args(str(tmp_path))["max_question_len"] == 20
