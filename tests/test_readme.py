"""The README's Python examples run as written.

Every ```python block of README.md is executed, in order, in one namespace, from a working folder that
holds a random checkpoint named `tinyroberta-mrqa`: a local directory wins over the alias of the same name
(catalog.resolve_dir looks for a directory first), so the examples run offline, unchanged. Only their
running is checked, not their answers (the weights are random); what the answers are is tested elsewhere.
"""
import os
import re

import pytest
from conftest import ROOT
from hermetic import tiny_checkpoint


def python_blocks():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_api_examples():
    code = "\n".join(python_blocks())
    for call in ("QuestionAnswerer.from_pretrained", ".answer(", "top_k=", ".answer_batch(", ".answer_stream(",
                 "handle_impossible_answer=", "load_model(", ".read("):
        assert call in code


def test_readme_python_examples_run(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "tinyroberta-mrqa")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace = {"__name__": "readme"}
        for i, block in enumerate(python_blocks()):
            try:
                exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
            except Exception as e:  # report which block, with its text
                pytest.fail(f"README python block {i + 1} fails: {type(e).__name__}: {e}\n{block}")
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().out  # the examples print their answers
