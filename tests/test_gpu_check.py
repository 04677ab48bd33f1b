"""benchmarks/gpu_check.py stays runnable: its CPU dry run (tiny models, a few steps) passes every check it
does not skip and writes the report a GPU run would, section for section; a failing check is recorded and
the others still run; its built-in real configs are the shared config files' shapes."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, shared_data_dir

CHECKS = {"parity/roberta", "parity/bert", "parity/electra", "parity/deberta-v2", "setup", "distill/cached",
          "distill/on-the-fly", "throughput/train", "throughput/inference", "intermediate", "minilmv2", "ddp"}


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    return r, json.loads(out.read_text()) if out.exists() else None


def test_dry_run_passes_every_check(dry_run):
    r, report = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert report["passed"] and not report["budget_exceeded"]
    assert report["mode"] == "dry-run" and report["device"] == "cpu"
    for key in ("device_name", "torch", "transformers", "date", "seconds"):
        assert report[key], key
    assert set(report["checks"]) == CHECKS
    for name, sec in report["checks"].items():
        assert sec["status"] in ("passed", "skipped"), (name, sec)
        assert sec["status"] == "passed" or sec["reason"], name
    assert "PASSED: " in r.stdout and all(name in r.stdout for name in CHECKS)  # the printed summary


def test_dry_run_numbers(dry_run):
    """Each section carries the numbers the docs report: parity per dtype within its tolerance, windows/s,
    falling losses, throughput ratios, the DDP run's processes."""
    checks = dry_run[1]["checks"]
    for family in ("roberta", "bert", "electra", "deberta-v2"):
        sec = checks[f"parity/{family}"]
        for dtype in ("fp32", "bf16", "fp16"):
            r = sec[dtype]
            if "skipped" not in r:  # fp16 runs where the CPU build has the kernels (torch 2.13's does)
                assert r["passed"] and r["max_abs_diff"] <= r["tolerance"], (family, dtype, r)
        assert sec["fp32"]["tolerance"] == 1e-4
    for name in ("distill/cached", "distill/on-the-fly"):
        sec = checks[name]
        assert sec["windows_per_s"] > 0 and sec["steps"] == 24 and sec["peak_memory"]
        assert sec["loss_mean_last_k"] < 0.95 * sec["loss_mean_first_k"]
    assert checks["distill/on-the-fly"]["first_step_ce_loss_vs_cached"]["diff"] <= 1e-5
    assert 0 < checks["distill/on-the-fly"]["teacher_share"] < 1
    for name in ("throughput/train", "throughput/inference"):
        assert checks[name]["tinyqa_vs_transformers"] > 0
        assert set(checks[name]["windows_per_s"]) == {"tinyqa", "transformers"}
    assert checks["intermediate"]["steps"] == 6 and set(checks["intermediate"]["last_parts"]) == {
        "embedding_loss", "hidden_loss", "attention_loss"}
    assert checks["minilmv2"]["steps"] == 6 and set(checks["minilmv2"]["last_parts"]) == {
        "qq_loss", "kk_loss", "vv_loss"}
    if checks["ddp"]["status"] == "passed":
        assert checks["ddp"]["processes"] == 2 and checks["ddp"]["backend"] == "gloo"


def test_a_failing_check_is_recorded_and_the_others_run(tmp_path, capsys):
    gc = _gpu_check()
    report = gc.Report(str(tmp_path / "r.json"), {"mode": "test"}, budget=60)

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nmore detail")

    def skipped():
        raise gc.Skip("one GPU")

    report.run("broken", broken)
    report.run("short", lambda: ({"x": 1.0}, ["x fell short"]))
    report.run("fine", lambda: ({"x": float("nan"), "summary": "ok"}, []))
    report.run("skipped", skipped)
    saved = json.loads((tmp_path / "r.json").read_text())
    c = saved["checks"]
    assert c["broken"]["status"] == "failed"
    assert c["broken"]["error"] == "RuntimeError: CUDA error: an illegal memory access"  # its first line
    assert "Traceback" in c["broken"]["traceback"]
    assert c["short"] == {**c["short"], "status": "failed", "error": "x fell short", "x": 1.0}
    assert c["fine"]["status"] == "passed" and c["fine"]["x"] is None  # strict JSON: NaN written as null
    assert c["skipped"] == {**c["skipped"], "status": "skipped", "reason": "one GPU"}
    assert saved["passed"] is False
    out = capsys.readouterr().out
    assert "FAIL  broken" in out and "PASS  fine" in out and "SKIP  skipped" in out
    over = gc.Report(str(tmp_path / "o.json"), {}, budget=0)
    over.run("late", lambda: ({}, []))
    assert over.data["checks"]["late"]["status"] == "skipped"
    assert over.data["budget_exceeded"] and not over.data["passed"]


def test_help_names_every_flag():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--help"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0
    for flag in ("--dry-run", "--device", "--out", "--steps", "--time-budget", "--only", "--seed", "--keep-work"):
        assert flag in r.stdout


def test_built_in_configs_are_the_shared_files_shapes():
    """Without ../shared the real check builds its models from built-in shapes: they must be the files'."""
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared data not found (set TINYQA_SHARED)")
    from tinyqa.model import EncoderConfig
    gc = _gpu_check()
    for name, (path, shape) in gc.REAL.items():
        ours = EncoderConfig.from_dict(shape).to_dict()
        theirs = EncoderConfig.from_json(os.path.join(d, "configs", path)).to_dict()
        assert ours == theirs, name
