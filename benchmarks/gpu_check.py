"""One command that checks tinyqa on a CUDA machine and writes what it found as one JSON report.

    python benchmarks/gpu_check.py                      # CUDA, real sizes: meant to fit 8 minutes on one H100
    python benchmarks/gpu_check.py --dry-run            # CPU, tiny sizes, under a minute: what CI runs
    python benchmarks/gpu_check.py --only parity ddp    # a subset, e.g. to rerun what failed

The checks, each a section of the report with its own status and numbers; one that fails is recorded
with its error line and traceback, and the others still run; the exit code is 1 if any failed:
- parity/<family>: a random transformers QA model of each family (RoBERTa, BERT, ELECTRA, DeBERTa-v3;
  tinyroberta's and the base configs' shapes, ELECTRA-Small's for its embedding projection) saved by
  transformers and loaded by `tinyqa.load_model`, start/end logits compared on a padded batch in fp32,
  bf16 and fp16 (tolerances: `compare_dtype`);
- setup: the synthetic MRQA-format training data (long contexts, so windows are MRQA-shaped: about half
  of them full 384-token ones), its byte-level BPE, the student's config and the random teachers;
- distill/cached and distill/on-the-fly: prediction-layer distillation through tinyqa's real entry
  (`tinyqa.cli.distill_args` + `tinyqa.train.train`), a tinyroberta-shaped student from roberta-large's
  shape, bf16 on CUDA; windows/s and the loss per step from the run's log.jsonl, peak memory; the loss
  must fall, and the two runs must agree on their first step (same student, batch and dropout masks);
- throughput/train and throughput/inference: tinyqa against transformers' model with the same config,
  weights and batches (and the same loss, `tinyqa.losses.span_ce_loss`, for training), best of
  alternating rounds;
- intermediate: a few steps of `--stage intermediate` (TinyBERT) from a roberta-base-shaped teacher;
- minilmv2: a few steps of `--stage minilmv2` from the roberta-large-shaped teacher (another width and head
  count than the student's), bf16 on CUDA;
- ddp: the distillation under torchrun over every GPU (nccl for the model, gloo for the loop's CPU
  tensors); skipped on one GPU; the dry run exercises it with 2 gloo processes on the CPU.
The report records the device's name, torch and transformers versions and the date. Nothing is
downloaded; the real configs are read from ../shared/data/configs where present, else built in here.
"""
import argparse
import copy
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import cpu_name, shared_data  # noqa: E402
from tinyqa import cli  # noqa: E402
from tinyqa.checks import check_output_file  # noqa: E402
from tinyqa.errors import TinyQAError  # noqa: E402
from tinyqa.features import FeaturizerConfig, collate, featurize  # noqa: E402
from tinyqa.files import finite, write_json  # noqa: E402
from tinyqa.losses import span_ce_loss  # noqa: E402
from tinyqa.model import EncoderConfig, EncoderForQA  # noqa: E402
from tinyqa.mrqa import read_mrqa  # noqa: E402
from tinyqa.synthetic import make_dataset, train_tokenizer, write_mrqa  # noqa: E402
from tinyqa.tokenizer import save_tokenizer  # noqa: E402
from tinyqa.train import param_groups, peak_memory, train  # noqa: E402
from tinyqa.weights import load_model, save_pretrained  # noqa: E402

# --- the models: real shapes (the shared config files where present, else these) and tiny ones

DEBERTA_V3 = dict(relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
                  position_buckets=256, share_att_key=True, norm_rel_ebd="layer_norm", type_vocab_size=0)
# name -> (file under ../shared/data/configs, the shape it holds); EncoderConfig fills the family's
# vocabulary, positions, LayerNorm eps and pad id, and writes the full HF config.json.
REAL = {
    "tinyroberta": ("tinyroberta.json", dict(model_type="roberta", num_hidden_layers=6, hidden_size=768,
                                             num_attention_heads=12, intermediate_size=3072)),
    "roberta-base": ("roberta-base.json", dict(model_type="roberta", num_hidden_layers=12, hidden_size=768,
                                               num_attention_heads=12, intermediate_size=3072)),
    "roberta-large": ("roberta-large.json", dict(model_type="roberta", num_hidden_layers=24, hidden_size=1024,
                                                 num_attention_heads=16, intermediate_size=4096)),
    "bert-base": ("family/bert-base-mrqa.json", dict(model_type="bert", num_hidden_layers=12, hidden_size=768,
                                                     num_attention_heads=12, intermediate_size=3072)),
    "electra-small": ("family/electra-small-mrqa.json", dict(model_type="electra", num_hidden_layers=12,
                                                             hidden_size=256, num_attention_heads=4,
                                                             intermediate_size=1024, embedding_size=128)),
    "deberta-v3-base": ("family/deberta-v3-base-mrqa.json", dict(model_type="deberta-v2", num_hidden_layers=12,
                                                                 hidden_size=768, num_attention_heads=12,
                                                                 intermediate_size=3072, **DEBERTA_V3)),
}


def tiny(family, layers, hidden, **kw):
    """A dry-run config: 4 heads, a feed-forward twice the width (ELECTRA's embeddings half of it)."""
    d = dict(model_type=family, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=4,
             intermediate_size=2 * hidden, vocab_size=1000)
    d.update(kw)
    if family == "electra":
        d["embedding_size"] = hidden // 2  # projected up, as ELECTRA-Small's 128 -> 256
    if family == "deberta-v2":
        d.update(DEBERTA_V3)
    return d


@dataclass
class Sizes:
    """Everything that differs between the real check and the dry run."""
    parity: dict  # family -> config name (REAL) or a tiny config dict
    parity_lengths: tuple  # real tokens per window of the parity batch (padded to the longest)
    student: object  # config name or dict; a dict's vocab_size None takes the tokenizer's
    teacher: object
    intermediate_teacher: object  # the intermediate stage compares attention head by head: the student's heads
    max_seq_len: int
    doc_stride: int
    max_question_len: int
    windows_per_context: float  # of the synthetic data at these windows, to size it for the steps
    batch_size: int
    lr: float  # a random student needs more than the card's 3e-5 to show progress in a few hundred steps
    steps: int
    intermediate_batch: int
    intermediate_steps: int
    speed_batch: int  # training throughput: windows per step; inference uses twice as many
    speed_steps: int
    speed_rounds: int
    ddp_steps: int
    time_budget: float
    dtypes: tuple = ("fp32", "bf16", "fp16")


FULL = Sizes(parity={"roberta": "tinyroberta", "bert": "bert-base", "electra": "electra-small",
                     "deberta-v2": "deberta-v3-base"},
             parity_lengths=(384, 301, 219, 128, 41, 9), student="tinyroberta", teacher="roberta-large",
             intermediate_teacher="roberta-base", max_seq_len=384, doc_stride=128, max_question_len=64,
             windows_per_context=5.0, batch_size=96, lr=1e-4, steps=300, intermediate_batch=32,
             intermediate_steps=30, speed_batch=32, speed_steps=30, speed_rounds=3, ddp_steps=100,
             time_budget=480)
DRY = Sizes(parity={f: tiny(f, 2, 64) for f in ("roberta", "bert", "electra", "deberta-v2")},
            # 160 tokens: DeBERTa's log-spaced buckets start beyond 128
            parity_lengths=(160, 97, 33, 8), student=tiny("roberta", 2, 64, vocab_size=None),
            teacher=tiny("roberta", 4, 128, vocab_size=None),
            intermediate_teacher=tiny("roberta", 4, 96, vocab_size=None),
            max_seq_len=128, doc_stride=32, max_question_len=32, windows_per_context=12.0, batch_size=16, lr=2e-3,
            steps=24, intermediate_batch=8, intermediate_steps=6, speed_batch=8, speed_steps=4, speed_rounds=1,
            ddp_steps=6, time_budget=240)


def config_dict(spec, vocab_size=None):
    """(HF config.json dict, where it came from) for a REAL name or a tiny dict; vocab_size fills a None."""
    if isinstance(spec, dict):
        d, source = dict(spec), "built-in tiny"
    else:
        path = os.path.join(shared_data(), "configs", REAL[spec][0])
        if os.path.exists(path):
            with open(path) as f:
                d, source = json.load(f), os.path.normpath(path)
        else:
            d, source = dict(REAL[spec][1]), "built-in"
    if d.get("vocab_size") is None:
        d["vocab_size"] = vocab_size
    return EncoderConfig.from_dict(d).to_dict(), source


# --- the report: one section per check, written after each so a crash keeps what ran

class Skip(Exception):
    """A check that does not apply here (one GPU for DDP, fp16 where the CPU lacks a kernel)."""


class Report:
    def __init__(self, path, env, budget):
        self.path, self.budget, self.t0 = path, budget, time.perf_counter()
        self.data = {"report": "tinyqa gpu_check", **env, "checks": {}}

    def elapsed(self):
        return time.perf_counter() - self.t0

    def skip(self, name, reason):
        self.record(name, {"status": "skipped", "reason": reason})

    def record(self, name, sec):
        self.data["checks"][name] = sec
        self.write()
        print(summary_line(name, sec), flush=True)

    def run(self, name, fn, *args):
        """Run one check: its numbers and status (passed / failed with the error line / skipped with why)."""
        sec = {}
        if self.elapsed() > self.budget:
            sec.update(status="skipped", reason=f"time budget of {self.budget:.0f} s spent", budget_exceeded=True)
        else:
            t = time.perf_counter()
            try:
                numbers, failures = fn(*args)
                sec.update(status="failed" if failures else "passed", **numbers)
                if failures:
                    sec["error"] = "; ".join(failures)
            except Skip as e:
                sec.update(status="skipped", reason=str(e))
            except Exception as e:  # recorded, and the other checks still run
                tb = traceback.format_exc()
                print(tb, file=sys.stderr)
                first = (str(e).strip().splitlines() or [""])[0]
                sec.update(status="failed", error=f"{type(e).__name__}: {first}", traceback=tb)
            sec["seconds"] = round(time.perf_counter() - t, 2)
            free_memory()
        self.record(name, sec)

    def write(self):
        checks = self.data["checks"].values()
        self.data["seconds"] = round(self.elapsed(), 1)
        self.data["budget_exceeded"] = any(c.get("budget_exceeded") for c in checks)
        self.data["passed"] = not self.data["budget_exceeded"] and all(c["status"] != "failed" for c in checks)
        write_json(self.path, finite(self.data), indent=2, allow_nan=False)


def summary_line(name, sec):
    status = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[sec["status"]]
    detail = sec.get("summary", "") if sec["status"] == "passed" else sec.get("error") or sec.get("reason", "")
    return f"{status}  {name:<22} {sec.get('seconds', 0):7.1f} s  {detail}"


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(args, device) -> dict:
    """What the numbers were measured on."""
    cuda = device.type == "cuda"
    try:
        hf = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        hf = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"mode": "dry-run" if args.dry_run else "full", "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "cpu": cpu_name(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": hf, "python": platform.python_version(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(), "git_commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "args": {k: v for k, v in vars(args).items()}}


# --- parity against transformers

def quiet_transformers():
    """transformers, imported here (only these checks need it) without its warnings and progress bars."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def parity_batch(cfg: EncoderConfig, lengths, seed):
    """Random token ids (never a special or pad id) right-padded to the longest window; in BERT and
    ELECTRA the last two thirds of each window are token type 1, as a context after its question."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), cfg.pad_token_id, dtype=torch.long)
    mask, types = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, cfg.vocab_size, (n,), generator=g)
        mask[i, :n] = 1
        if cfg.type_vocab_size > 1:
            types[i, n // 3:n] = 1
    return ids, mask, types


def randomize_norms_and_biases_(model, seed):
    """Inits leave LayerNorms at (1, 0) and biases at 0: randomised, so a swapped pair cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logits(model, batch, hf_style):
    ids, mask, types = batch
    with torch.inference_mode():
        if hf_style:
            out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        else:
            out = model(ids, mask, types)
    return torch.stack([out.start_logits.float(), out.end_logits.float()])  # (2, B, L)


def max_diff(a, b, keep):
    return (a[:, keep] - b[:, keep]).abs().max().item()


def compare_dtype(ctx, folder, hf32, ref, batch, dtype_name):
    """tinyqa loaded in dtype against the fp32 reference (transformers' logits), on the real tokens.

    fp32: within 1e-4, what tests/test_family.py holds all 17 real configs to (both compute the same
    float32 math; only the order of operations differs). bf16 and fp16: both models round the same
    computation at the same precision, so tinyqa's error against the fp32 reference may not exceed twice
    transformers' own error in that dtype, plus one unit in the last place at the logits' scale (bf16
    2^-7, fp16 2^-10): a cast in the wrong place, a mask or softmax in the wrong precision would be
    many times transformers' error."""
    dtype = cli.DTYPES[dtype_name]
    keep = batch[1].bool()
    ours = logits(load_model(folder, device=ctx.device, dtype=dtype, verbose=False), batch, False)
    if dtype_name == "fp32":
        err = max_diff(ours, ref, keep)
        return {"max_abs_diff": err, "tolerance": 1e-4, "padded_positions_max_abs_diff":
                max_diff(ours, ref, ~keep) if (~keep).any() else 0.0, "passed": err <= 1e-4}
    theirs = logits(copy.deepcopy(hf32).to(dtype), batch, True)
    if not torch.isfinite(theirs[:, keep]).all():
        raise Skip(f"transformers' own {dtype_name} logits are not finite")
    err, err_hf = max_diff(ours, ref, keep), max_diff(theirs, ref, keep)
    scale = max(1.0, ref[:, keep].abs().max().item())
    tol = 2 * err_hf + torch.finfo(dtype).eps * scale
    ok = bool(torch.isfinite(ours[:, keep]).all()) and err <= tol
    return {"max_abs_diff": err, "transformers_max_abs_diff": err_hf,
            "tinyqa_vs_transformers": max_diff(ours, theirs, keep), "tolerance": tol, "passed": ok}


def check_parity(ctx, family):
    transformers = quiet_transformers()
    d, source = config_dict(ctx.sizes.parity[family])
    torch.manual_seed(ctx.args.seed)
    hf_cfg = transformers.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})
    hf32 = randomize_norms_and_biases_(transformers.AutoModelForQuestionAnswering.from_config(hf_cfg), ctx.args.seed)
    folder = os.path.join(ctx.work, f"parity-{family}")
    hf32.save_pretrained(folder)
    hf32 = hf32.to(ctx.device).eval()
    cfg = EncoderConfig.from_dict(d)
    batch = tuple(t.to(ctx.device) for t in parity_batch(cfg, ctx.sizes.parity_lengths, ctx.args.seed))
    ref = logits(hf32, batch, True)
    spec = ctx.sizes.parity[family]
    out = {"config": spec if isinstance(spec, str) else "tiny", "config_source": source,
           "layers_x_hidden": f"{cfg.num_hidden_layers}x{cfg.hidden_size}", "lengths": list(ctx.sizes.parity_lengths),
           "transformers_attention": hf32.config._attn_implementation}
    failures, parts = [], []
    for name in ctx.sizes.dtypes:
        try:
            r = compare_dtype(ctx, folder, hf32, ref, batch, name)
        except Skip as e:
            r = {"skipped": str(e)}
        except RuntimeError as e:
            if ctx.device.type != "cpu" or "Half" not in str(e):
                raise
            r = {"skipped": f"this CPU build lacks a {name} kernel: {str(e).splitlines()[0]}"}
        out[name] = r
        if "skipped" in r:
            parts.append(f"{name} skipped")
            continue
        parts.append(f"{name} {r['max_abs_diff']:.1e} (tol {r['tolerance']:.1e})")
        if not r["passed"]:
            failures.append(f"{name}: max |diff| {r['max_abs_diff']:.3g} > tolerance {r['tolerance']:.3g}")
    out["summary"] = ", ".join(parts)
    return out, failures


# --- the training workload: data, tokenizer, configs, random teachers

def check_setup(ctx):
    """Synthetic MRQA-format data sized for --steps (long contexts: several windows each), a byte-level BPE
    trained on it, the student's config.json and the random teachers saved as checkpoints."""
    s, w = ctx.sizes, ctx.workload
    n = math.ceil(ctx.steps * s.batch_size / s.windows_per_context)
    rows = make_dataset(n, ctx.args.seed, long_fraction=0.6, long_people=(14, 20))
    w.train = write_mrqa(os.path.join(ctx.work, "train.jsonl.gz"), rows)
    tok = train_tokenizer([r["context"] for r in rows] + [q["question"] for r in rows for q in r["qas"]], 4000)
    w.tokenizer = os.path.join(ctx.work, "tokenizer")
    save_tokenizer(tok, w.tokenizer)
    fcfg = FeaturizerConfig(s.max_seq_len, s.doc_stride, s.max_question_len)
    w.features = featurize(list(read_mrqa(w.train)), tok, fcfg, with_offsets=False)
    lengths = np.array([len(f.input_ids) for f in w.features])
    out = {"contexts": n, "questions": sum(len(r["qas"]) for r in rows), "windows": len(w.features),
           "mean_window_tokens": round(float(lengths.mean()), 1),
           "full_windows": round(float((lengths == s.max_seq_len).mean()), 3), "vocab": tok.get_vocab_size()}
    student, out["student_config"] = config_dict(s.student, tok.get_vocab_size())
    w.student_config = os.path.join(ctx.work, "student.json")
    with open(w.student_config, "w") as f:
        json.dump(student, f)
    w.pad_id, w.student = student["pad_token_id"], student
    for key, spec in (("teacher", s.teacher), ("intermediate_teacher", s.intermediate_teacher)):
        d, out[f"{key}_config"] = config_dict(spec, tok.get_vocab_size())
        torch.manual_seed(ctx.args.seed + 1)
        with torch.device(ctx.device):  # initialised where it runs: a 355M-parameter init is slow on a CPU
            model = EncoderForQA(EncoderConfig.from_dict(d))
        setattr(w, key, os.path.join(ctx.work, key))
        save_pretrained(model, getattr(w, key), tokenizer=tok)
        out[f"{key}_params"] = model.num_params()
        del model
    with torch.device("meta"):
        out["student_params"] = EncoderForQA(EncoderConfig.from_dict(student)).num_params()
    out["summary"] = (f"{out['windows']} windows ({out['mean_window_tokens']:.0f} tokens mean, "
                      f"{100 * out['full_windows']:.0f}% full), student {out['student_params'] / 1e6:.1f}M, "
                      f"teacher {out['teacher_params'] / 1e6:.1f}M")
    return out, []


# --- distillation through tinyqa's own entry

def train_argv(ctx, out, batch_size, steps, *extra):
    """distill_args' command line for `steps` optimizer steps over the workload: whole epochs enough for
    them (the schedule's warmup and decay fit the run), stopped after `steps` with --stop-after."""
    w, s = ctx.workload, ctx.sizes
    per_epoch = math.ceil(len(w.features) / batch_size)
    epochs = math.ceil(steps / per_epoch)
    argv = ["--train", w.train, "--tokenizer", w.tokenizer, "--init-config", w.student_config,
            "--max-seq-len", s.max_seq_len, "--doc-stride", s.doc_stride, "--max-question-len", s.max_question_len,
            "--batch-size", batch_size, "--epochs", epochs, "--lr", s.lr, "--warmup-proportion", 0.1,
            "--device", str(ctx.device), "--precision", ctx.precision, "--seed", ctx.args.seed,
            "--feature-store", os.path.join(ctx.work, "features"), "--save-every", 0, "--keep-checkpoints", 1,
            "--quiet", "--out", os.path.join(ctx.work, out), *extra]
    if epochs * per_epoch > steps:
        argv += ["--stop-after", steps]
    return [str(a) for a in argv]


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets this process's VmHWM to its current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def run_train(ctx, argv):
    """train() on distill_args(argv), its talk sent to OUT.log beside its --out folder: (seconds, peak
    memory as tinyqa.train.peak_memory reports it, the step rows of its log.jsonl)."""
    out = argv[argv.index("--out") + 1]
    reset_peak(ctx.device)
    t = time.perf_counter()
    with open(out + ".log", "w") as f, redirect_stdout(f):
        model = train(cli.distill_args(argv))
    seconds = time.perf_counter() - t
    del model
    return seconds, peak_memory(ctx.device), read_log(out)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if "step" in row]


def loss_numbers(rows, steps, batch_size):
    """Windows/s (median over the steps after the first tenth, the warm-up), the loss at the start and end
    (means over the first and last tenth), and what falls short: missing steps, a loss that is not finite
    or did not fall by 5%."""
    k = max(2, len(rows) // 10)
    losses = [r["loss"] for r in rows]
    rates = [r["examples_per_s"] for r in rows[k:]] or [r["examples_per_s"] for r in rows]
    out = {"steps": len(rows), "batch_size": batch_size, "windows_per_s": round(float(np.median(rates)), 1),
           "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
           "loss_mean_first_k": float(np.mean(losses[:k])) if losses else None,
           "loss_mean_last_k": float(np.mean(losses[-k:])) if losses else None, "k": k}
    failures = []
    if len(rows) != steps:
        failures.append(f"log.jsonl has {len(rows)} steps, expected {steps}")
    if not all(math.isfinite(x) for x in losses):
        failures.append("the loss is not finite")
    elif losses and not np.mean(losses[-k:]) < 0.95 * np.mean(losses[:k]):
        failures.append(f"the loss did not fall: mean of the first {k} steps {np.mean(losses[:k]):.4f}, "
                        f"of the last {k} {np.mean(losses[-k:]):.4f}")
    return out, failures


def distill_result(ctx, seconds, peak, rows, steps, batch_size):
    """The numbers of a training run and what falls short (loss_numbers), the teacher's share of the step
    time when it ran per batch."""
    out, failures = loss_numbers(rows, steps, batch_size)
    out.update(seconds_total=round(seconds, 1), precision=ctx.precision)
    if peak:
        out["peak_memory"] = peak
    if rows and "teacher_s" in rows[0]:  # share of each step spent in the teacher's forward pass
        out["teacher_share"] = round(float(np.median([r["teacher_s"] * r["examples_per_s"] / batch_size
                                                      for r in rows])), 3)
    out["summary"] = (f"{out['windows_per_s']:.0f} windows/s, loss {out['loss_first']:.3f} -> {out['loss_last']:.3f}"
                      + (f", peak {peak}" if peak else "") if rows else "")
    return out, failures


def check_distill_cached(ctx):
    """The card's default: the teacher's logits computed once into the cache, then --steps steps reading
    them back. A first run of one step builds the cache and the feature store, so the timed run and its
    peak memory are the loop's alone (the first run's seconds and peak: start-up, featurization and the
    teacher's pass over every window)."""
    s = ctx.sizes
    cache = ["--teacher", ctx.workload.teacher, "--teacher-cache", os.path.join(ctx.work, "teacher-cache")]
    seconds, peak, _ = run_train(ctx, train_argv(ctx, "distill-warm", s.batch_size, 1, *cache))
    build = {"cache_build_seconds": round(seconds, 1), "cache_build_peak_memory": peak}
    run = run_train(ctx, train_argv(ctx, "distill-cached", s.batch_size, ctx.steps, *cache))
    out, failures = distill_result(ctx, *run, ctx.steps, s.batch_size)
    return {**out, **build}, failures


def check_distill_on_the_fly(ctx):
    """--teacher-on-the-fly: the teacher runs on every batch. Same student init, batches and dropout masks
    as the cached run (the teacher is loaded in a forked RNG and runs in eval mode), so the first steps'
    span CE must be equal and their KD terms differ only by the cache's float16 rounding of the teacher's
    logits (relative 2^-11; in bf16 also the teacher's batch shapes): within 1e-3, 2e-2 in bf16, plus the
    log's rounding to 5 decimals."""
    s = ctx.sizes
    argv = train_argv(ctx, "distill-on-the-fly", s.batch_size, ctx.steps, "--teacher", ctx.workload.teacher,
                      "--teacher-on-the-fly")
    seconds, peak, rows = run_train(ctx, argv)
    out, failures = distill_result(ctx, seconds, peak, rows, ctx.steps, s.batch_size)
    cached = os.path.join(ctx.work, "distill-cached", "log.jsonl")
    if os.path.exists(cached) and rows:
        first = read_log(os.path.dirname(cached))[0]
        tol = 1e-3 if ctx.precision == "fp32" else 2e-2
        for part in ("ce_loss", "kd_loss"):
            diff = abs(rows[0][part] - first[part])
            out[f"first_step_{part}_vs_cached"] = {"on_the_fly": rows[0][part], "cached": first[part], "diff": diff}
            if diff > tol * abs(first[part]) + 1e-5:
                failures.append(f"first step's {part} {rows[0][part]} vs the cached run's {first[part]} (relative "
                                f"tolerance {tol})")
    cached_rate = ctx.report.data["checks"].get("distill/cached", {}).get("windows_per_s")
    if cached_rate and out.get("windows_per_s"):
        out["cached_speedup"] = round(cached_rate / out["windows_per_s"], 2)
        out["summary"] += f"; cached is {out['cached_speedup']:.2f}x"
    return out, failures


# --- throughput against transformers, same config, weights and batches

def speed_models(ctx, dtype=torch.float32):
    """tinyqa's and transformers' model of the student's config with the same random weights (one folder
    both load), on the device in dtype."""
    transformers = quiet_transformers()
    folder = os.path.join(ctx.work, "speed-model")
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        torch.manual_seed(ctx.args.seed)
        save_pretrained(EncoderForQA(EncoderConfig.from_dict(ctx.workload.student)), folder)
    ours = load_model(folder, device=ctx.device, dtype=dtype, verbose=False)
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(folder, attn_implementation="sdpa")
    return ours, hf.to(device=ctx.device, dtype=dtype)


def speed_batches(ctx, batch_size, n):
    """n batches of batch_size windows drawn at random (seeded) from the workload, on the device."""
    rng = np.random.default_rng(ctx.args.seed)
    feats, out = ctx.workload.features, []
    for _ in range(n):
        picked = [feats[i] for i in rng.choice(len(feats), batch_size, replace=False)]
        out.append({k: v.to(ctx.device) for k, v in collate(picked, True, ctx.workload.pad_id).items()})
    return out


def forward(model, b, hf_style):
    if hf_style:
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
    return model(b["input_ids"], b["attention_mask"], b["token_type_ids"])


def loss_of(model, b, hf_style):
    out = forward(model, b, hf_style)
    return span_ce_loss(out.start_logits, out.end_logits, b["start_positions"], b["end_positions"], b["attention_mask"])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(ctx, model, hf_style, batches, warmup):
    """Windows/s of AdamW steps on the span CE (the autocast of --precision), after `warmup` untimed steps."""
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-5)
    for i, b in enumerate(batches):
        if i == warmup:
            sync(ctx.device)
            t = time.perf_counter()
        with ctx.autocast():
            loss = loss_of(model, b, hf_style)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(ctx.device)
    return sum(len(b["input_ids"]) for b in batches[warmup:]) / (time.perf_counter() - t)


def check_train_throughput(ctx):
    """Training steps of both models on the same batches, alternated round by round (best of each).
    First, in eval mode, both must give the same loss on the first batch: within 1e-4 relative in fp32,
    2e-2 under bf16/fp16 autocast, whose rounding (2^-8 relative per op in bf16) the layers compound."""
    s = ctx.sizes
    ours, hf = speed_models(ctx)
    warmup = max(1, s.speed_steps // 5)
    batches = speed_batches(ctx, s.speed_batch, warmup + s.speed_steps)
    with torch.no_grad(), ctx.autocast():
        a, b = (loss_of(m.eval(), batches[0], h).item() for m, h in ((ours, False), (hf, True)))
    tol = 1e-4 if ctx.precision == "fp32" else 2e-2
    failures = [] if abs(a - b) <= tol * max(1.0, abs(b)) else [f"first-batch loss {a:.6f} vs transformers' {b:.6f}"]
    best = {"tinyqa": 0.0, "transformers": 0.0}
    for _ in range(s.speed_rounds):
        best["tinyqa"] = max(best["tinyqa"], train_rate(ctx, ours, False, batches, warmup))
        best["transformers"] = max(best["transformers"], train_rate(ctx, hf, True, batches, warmup))
    ratio = best["tinyqa"] / best["transformers"]
    out = {"precision": ctx.precision, "batch_size": s.speed_batch, "timed_steps": s.speed_steps,
           "rounds": s.speed_rounds, "first_batch_loss": {"tinyqa": a, "transformers": b},
           "windows_per_s": {k: round(v, 1) for k, v in best.items()}, "tinyqa_vs_transformers": round(ratio, 3),
           "summary": f"tinyqa {best['tinyqa']:.0f} vs transformers {best['transformers']:.0f} windows/s: {ratio:.2f}x"}
    return out, failures


def infer_rate(ctx, model, hf_style, batches):
    model.eval()
    with torch.inference_mode():
        forward(model, batches[0], hf_style)  # warm-up
        sync(ctx.device)
        t = time.perf_counter()
        for b in batches:
            forward(model, b, hf_style)
        sync(ctx.device)
    return sum(len(b["input_ids"]) for b in batches) / (time.perf_counter() - t)


def check_inference_throughput(ctx):
    """Forward passes of both models with their weights in the inference dtype (bf16 on CUDA, as
    `--dtype bf16`; fp32 on the CPU) on the same batches of twice the training batch, best of rounds."""
    s = ctx.sizes
    dtype = torch.float32 if ctx.precision == "fp32" else cli.DTYPES[ctx.precision]
    ours, hf = speed_models(ctx, dtype)
    batches = speed_batches(ctx, 2 * s.speed_batch, s.speed_steps)
    best = {"tinyqa": 0.0, "transformers": 0.0}
    for _ in range(s.speed_rounds):
        best["tinyqa"] = max(best["tinyqa"], infer_rate(ctx, ours, False, batches))
        best["transformers"] = max(best["transformers"], infer_rate(ctx, hf, True, batches))
    ratio = best["tinyqa"] / best["transformers"]
    out = {"dtype": str(dtype).removeprefix("torch."), "batch_size": 2 * s.speed_batch, "batches": s.speed_steps,
           "windows_per_s": {k: round(v, 1) for k, v in best.items()}, "tinyqa_vs_transformers": round(ratio, 3),
           "summary": f"tinyqa {best['tinyqa']:.0f} vs transformers {best['transformers']:.0f} windows/s: {ratio:.2f}x"}
    return out, []


# --- the intermediate stage and DDP

def check_intermediate(ctx):
    """A few steps of TinyBERT's stage (--stage intermediate) into the student's config from the
    roberta-base-shaped teacher (its head count)."""
    return check_stage(ctx, "intermediate", ctx.workload.intermediate_teacher,
                       ("embedding_loss", "hidden_loss", "attention_loss"))


def check_minilmv2(ctx):
    """A few steps of MiniLMv2's stage (--stage minilmv2) into the student's config from the
    roberta-large-shaped teacher: relation heads shared by a wider, deeper teacher with more heads."""
    return check_stage(ctx, "minilmv2", ctx.workload.teacher, ("qq_loss", "kk_loss", "vv_loss"))


def check_stage(ctx, stage, teacher, parts):
    """A few steps of a representation stage; every loss finite. Whether it fell is recorded only: a few
    steps from a random student (and, for TinyBERT, a random projection) need not show it."""
    s = ctx.sizes
    argv = train_argv(ctx, stage, s.intermediate_batch, s.intermediate_steps, "--stage", stage, "--teacher", teacher)
    seconds, peak, rows = run_train(ctx, argv)
    out, failures = distill_result(ctx, seconds, peak, rows, s.intermediate_steps, s.intermediate_batch)
    out["loss_fell"] = not any("did not fall" in f for f in failures)
    failures = [f for f in failures if "did not fall" not in f]
    out["last_parts"] = {k: rows[-1][k] for k in parts} if rows else None
    return out, failures


def run_process_group(cmd, env, log, timeout):
    """cmd's exit code, its output in log; on timeout it is killed with every process it started (torchrun's
    workers would otherwise outlive it, holding their GPUs), and the timeout raised."""
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                               start_new_session=True) as proc:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def check_ddp(ctx):
    """train_distill.py under torchrun, one process per GPU (2 gloo processes on the CPU in the dry run),
    with a fresh teacher cache so the ranks also share its computation; the global batch is the single
    run's, rounded up to a multiple of the processes."""
    if ctx.device.type == "cuda":
        n = torch.cuda.device_count()
        if n < 2:
            raise Skip("one GPU")
    elif not ctx.args.dry_run:
        raise Skip("full sizes on the CPU: DDP over gloo is exercised by --dry-run")
    else:
        n = 2
    s = ctx.sizes
    batch = math.ceil(s.batch_size / n) * n
    steps = min(ctx.steps, s.ddp_steps)
    argv = train_argv(ctx, "ddp", batch, steps, "--teacher", ctx.workload.teacher,
                      "--teacher-cache", os.path.join(ctx.work, "teacher-cache-ddp"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           os.path.join(ROOT, "train_distill.py"), *argv]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    log = os.path.join(ctx.work, "ddp.log")
    t = time.perf_counter()
    returncode = run_process_group(cmd, env, log, timeout=max(120.0, ctx.report.budget - ctx.report.elapsed()))
    seconds = time.perf_counter() - t
    if returncode != 0:
        with open(log) as f:
            tail = [line.strip() for line in f if line.strip()][-3:]
        return {"processes": n, "log_tail": tail}, [f"torchrun exited {returncode}: {' | '.join(tail)}"]
    out, failures = distill_result(ctx, seconds, None, read_log(os.path.join(ctx.work, "ddp")), steps, batch)
    out.update(processes=n, backend="cpu:gloo,cuda:nccl" if ctx.device.type == "cuda" else "gloo")
    single = ctx.report.data["checks"].get("distill/cached", {}).get("windows_per_s")
    if single and out.get("windows_per_s"):
        out["vs_one_process"] = round(out["windows_per_s"] / single, 2)
    out["summary"] = f"{n} processes: " + out["summary"]
    return out, failures


# --- the command

CHECKS = ("parity", "distill", "throughput", "intermediate", "minilmv2", "ddp")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="tiny models and a few steps on the CPU (under a minute on 2 cores): keeps this script "
                        "runnable in CI; with --device cuda, the same tiny check on a GPU")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda for the real check, cpu with --dry-run); real sizes on a "
                        "CPU take hours")
    p.add_argument("--out", default=None,
                   help="the JSON report (default: gpu_check.json, gpu_check_dry_run.json with --dry-run)")
    p.add_argument("--steps", type=cli.positive_int, default=None,
                   help="optimizer steps of each distillation run (default: 300, 24 with --dry-run); the data "
                        "is sized so that the runs' schedule fits them")
    p.add_argument("--time-budget", type=cli.positive_float, default=None, metavar="SECONDS",
                   help="checks not yet started when this is spent are skipped, and the run fails (default: 480, "
                        "the 8 minutes the check must fit on one H100; 240 with --dry-run)")
    p.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), help="run only these checks")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="seed of the random models, data and batches")
    p.add_argument("--keep-work", action="store_true",
                   help="keep the working folder (data, checkpoints, each run's log.jsonl and printed output)")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    args.out = args.out or ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is visible; run with --dry-run for the CPU check")
    try:
        check_output_file(args.out, "--out")  # before the work, not after the first check
    except TinyQAError as e:
        p.error(str(e))
    return args


def make_context(args, report, work):
    sizes = DRY if args.dry_run else FULL
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"  # what the training runs use; CPUs train in fp32
    amp = cli.DTYPES[precision]
    return SimpleNamespace(
        args=args, sizes=sizes, device=device, precision=precision, work=work, report=report,
        steps=args.steps or sizes.steps, workload=SimpleNamespace(),
        autocast=lambda: nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=amp))


def plan(ctx):
    """(name, function, args) of the checks to run, in order; setup first where training needs it."""
    only, steps = ctx.args.only, []
    if "parity" in only:
        steps += [(f"parity/{f}", check_parity, (ctx, f)) for f in ctx.sizes.parity]
    if set(only) & {"distill", "throughput", "intermediate", "minilmv2", "ddp"}:
        steps.append(("setup", check_setup, (ctx,)))
    if "distill" in only:
        steps += [("distill/cached", check_distill_cached, (ctx,)),
                  ("distill/on-the-fly", check_distill_on_the_fly, (ctx,))]
    if "throughput" in only:
        steps += [("throughput/train", check_train_throughput, (ctx,)),
                  ("throughput/inference", check_inference_throughput, (ctx,))]
    if "intermediate" in only:
        steps.append(("intermediate", check_intermediate, (ctx,)))
    if "minilmv2" in only:
        steps.append(("minilmv2", check_minilmv2, (ctx,)))
    if "ddp" in only:
        steps.append(("ddp", check_ddp, (ctx,)))
    return steps


NEEDS_SETUP = {check_distill_cached, check_distill_on_the_fly, check_train_throughput, check_inference_throughput,
               check_intermediate, check_minilmv2, check_ddp}


def main(argv=None):
    args = get_args(argv)
    budget = args.time_budget or (DRY if args.dry_run else FULL).time_budget
    work = tempfile.mkdtemp(prefix="tinyqa-gpu-check-")
    os.environ["TINYQA_CACHE"] = os.path.join(work, "cache")  # feature stores and hashes never touch ~/.cache
    report = Report(args.out, environment(args, torch.device(args.device)), budget)
    report.data["time_budget_s"] = budget
    ctx = make_context(args, report, work)
    print(f"tinyqa gpu_check ({report.data['mode']}) on {report.data['device_name']}, torch {torch.__version__}, "
          f"work folder {work}", flush=True)
    try:
        for name, fn, fn_args in plan(ctx):
            if fn in NEEDS_SETUP and report.data["checks"]["setup"]["status"] != "passed":
                report.skip(name, "the setup did not pass")
            else:
                report.run(name, fn, *fn_args)
    finally:
        report.write()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    d = report.data
    print("\n" + "\n".join(summary_line(name, sec) for name, sec in d["checks"].items()))
    n = {s: sum(c["status"] == s for c in d["checks"].values()) for s in ("passed", "failed", "skipped")}
    over = " (over the time budget)" if d["budget_exceeded"] else ""
    print(f"{'PASSED' if d['passed'] else 'FAILED'}: {n['passed']} passed, {n['failed']} failed, {n['skipped']} "
          f"skipped in {d['seconds']:.0f} s{over}; report: {args.out}")
    return 0 if d["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
