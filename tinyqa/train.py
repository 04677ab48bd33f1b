"""The one training loop behind train_distill.py and train_finetune.py.

Notable:
- one optimizer step sees `--batch-size` windows in all (the card's 96), split over DDP ranks and then
  over `--grad-accum` micro-batches (grouped by window length, so each pads less); each micro-batch's mean
  loss is weighted by its share of the global batch, so 1 GPU x 4 accumulation steps and 4 GPUs x 1
  optimise the same thing;
- AdamW (no decay on biases and LayerNorm), clipping at 1.0, LinearWarmup through LambdaLR;
- teacher logits computed once into a float16 on-disk cache keyed by the content of data + teacher +
  featurizer (tinyqa/teacher_cache.py), or per batch with --teacher-on-the-fly;
- HF-layout checkpoints with the resolved arguments and the training state beside them, so that
  `--resume DIR` continues bit for bit (data order is a function of seed and epoch, RNG states saved);
  Ctrl-C or SIGTERM saves one before exiting (tinyqa/runs.py);
- everything checkable is checked before any work: flag ranges in the parser, then files, device, --out,
  the models' positions against --max-seq-len and the tokenizer against their embeddings; a loss that
  turns NaN or infinite stops the run naming the step, and nothing broken is saved;
- `torchrun --nproc-per-node N` runs DistributedDataParallel (nccl on GPU, gloo on CPU).
"""
import argparse
import math
import os
import random
import shutil
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from . import teacher_cache
from .checks import (check_device, check_featurizer, check_input_files, check_output_dir, learning_rate,
                     nonneg_float, nonneg_int, positive_float, positive_int, seed_int, unit_float)
from .errors import TinyQAError
from .features import FeaturizerConfig, check_model_fits, length_sorted_batches, pair_layout
from .infer import max_tokens_for
from .intermediate import (ProjectedStudent, check_layer_map, parse_layer_map, student_from_teacher_layers,
                           teacher_targets, uniform_layer_map)
from .losses import distillation_loss, intermediate_loss, span_ce_loss
from .model import EncoderConfig, EncoderForQA
from .mrqa import read_files, split_files
from .runs import (RunLog, StopSignal, check_fresh_out, clear_run, load_training_state, prune_checkpoints, restart_log,
                   resume_args, rng_states, save_checkpoint, save_final, set_rng_states)
from .store import FeatureStore, open_store
from .store import default_root as store_root
from .tokenizer import load_tokenizer, tokenizer_fingerprint
from .weights import load_model, load_model_config, resolve_dir


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every flag's default (not the empty ones: None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


_UNSET = object()


class ArgumentParser(argparse.ArgumentParser):
    """argparse that also records which flags the command line named, as `args.given`: --resume refuses
    those that would change the run instead of silently ignoring them. argparse fills in a default only
    where the namespace has no value yet, so a parse into a namespace pre-filled with a marker leaves the
    marker exactly where no flag was given."""

    def parse_known_args(self, args=None, namespace=None):
        if namespace is not None:
            return super().parse_known_args(args, namespace)
        dests = {a.dest for a in self._actions if a.dest != argparse.SUPPRESS and a.default != argparse.SUPPRESS}
        probe, _ = super().parse_known_args(args, argparse.Namespace(**dict.fromkeys(dests, _UNSET)))
        ns, rest = super().parse_known_args(args)
        ns.given = sorted(d for d in dests if getattr(probe, d) is not _UNSET)
        return ns, rest


# The model card's hyperparameters: the defaults of train_distill.py and train_finetune.py.
DISTILL_CARD = dict(
    teacher="roberta-large-mrqa",
    student="tinyroberta-squad2-step1",  # deepset's 6-layer student after its first distillation stage
    batch_size=96,
    epochs=4,
    lr=3e-5,
    warmup_proportion=0.2,  # LinearWarmup
    distillation_loss_weight=0.75,
    temperature=1.5,
    out="runs/distill",
)
# `--stage intermediate` (TinyBERT's first stage, which made deepset's tinyroberta-squad2-step1): its teacher
# and student are those of deepset's lineage (roberta-base-squad2 teaching the general-distilled 6-layer
# tinyroberta-6l-768d); lr 5e-5 and batch 32 are TinyBERT's task-distillation values (section 4.2), warmup
# 0.1 its task_distill.py default. Epochs are our choice: TinyBERT's 10-20 epochs were over GLUE sets a
# fraction of MRQA's 516,819 questions.
INTERMEDIATE_DEFAULTS = dict(
    teacher="roberta-base-squad2",
    student="tinyroberta-6l-768d",
    batch_size=32,
    epochs=3,
    lr=5e-5,
    warmup_proportion=0.1,
    out="runs/step1",
)
FINETUNE_CARD = dict(
    model="runs/distill",  # the distilled student that train_distill.py writes by default
    batch_size=16,
    epochs=3,
    lr=1e-5,
    warmup_proportion=0.2,
    out="runs/finetune",
)


def build_parser(distill: bool, defaults: dict = None, description: str = "") -> argparse.ArgumentParser:
    """The command line of both training scripts; `defaults` are the model card's values unless given."""
    defaults = defaults or (DISTILL_CARD if distill else FINETUNE_CARD)
    p = ArgumentParser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--train", nargs="+", metavar="FILE",
                   help="MRQA .jsonl(.gz) training files (default: download the official MRQA train split)")
    g.add_argument("--limit", type=positive_int, default=None, help="use only the first N questions of each training file")
    g.add_argument("--skip-bad", action="store_true", help="skip malformed lines (counted and reported)")
    g.add_argument("--eval-data", nargs="+", metavar="FILE", help="MRQA files to score (EM/F1) after each epoch")
    g = p.add_argument_group("model")
    if distill:
        g.add_argument("--stage", choices=["prediction", "intermediate"], default="prediction",
                       help="prediction: the card's stage, the student learns the teacher's start/end logits; "
                            "intermediate: TinyBERT's first stage, it learns the teacher's embeddings, hidden "
                            "states and attention scores (the defaults marked 'intermediate:' then apply)")
        g.add_argument("--teacher", default=defaults["teacher"],
                       help=f"teacher: alias, hub id or directory (intermediate: {INTERMEDIATE_DEFAULTS['teacher']})")
        g.add_argument("--student", default=defaults["student"],
                       help="student init: alias, hub id or directory (a base LM gets a fresh QA head; "
                            f"intermediate: {INTERMEDIATE_DEFAULTS['student']})")
        g.add_argument("--student-layers", type=positive_int, default=None, metavar="N",
                       help="start the student from N of the teacher's own layers instead (its embeddings, layers "
                            "k, 2k, ... with k = teacher layers / N, and its QA head)")
    else:
        g.add_argument("--model", default=defaults["model"], help="model to fine-tune: alias, hub id or directory")
    g.add_argument("--init-config", metavar="CONFIG_JSON",
                   help="start the trained model from random weights with this HF config.json instead")
    g.add_argument("--tokenizer", default=None, help="tokenizer (default: the trained model's own)")
    g = p.add_argument_group("featurizer")
    g.add_argument("--max-seq-len", type=positive_int, default=384, help="tokens per window, special tokens included")
    g.add_argument("--doc-stride", type=nonneg_int, default=128, help="overlap in tokens between consecutive windows")
    g.add_argument("--max-query-length", type=positive_int, default=64, help="question tokens kept")
    g = p.add_argument_group("optimisation (model card defaults)")
    stage_note = (lambda k: f" (intermediate: {INTERMEDIATE_DEFAULTS[k]})") if distill else (lambda k: "")
    g.add_argument("--batch-size", type=positive_int, default=defaults["batch_size"],
                   help="windows per optimizer step, all GPUs together" + stage_note("batch_size"))
    g.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches per optimizer step (per process), each a run of the step's windows "
                   "by length: the same gradient, less padding")
    g.add_argument("--epochs", type=positive_int, default=defaults["epochs"],
                   help="passes over the training windows" + stage_note("epochs"))
    g.add_argument("--lr", type=learning_rate, default=defaults["lr"], help="peak learning rate" + stage_note("lr"))
    g.add_argument("--warmup-proportion", type=unit_float, default=defaults["warmup_proportion"],
                   help="fraction of the optimizer steps spent warming the lr up linearly from 0"
                        + stage_note("warmup_proportion"))
    g.add_argument("--weight-decay", type=nonneg_float, default=0.01, help="AdamW weight decay (none on biases, LayerNorm)")
    g.add_argument("--max-grad-norm", type=positive_float, default=1.0, help="gradient clipping norm")
    g.add_argument("--seed", type=seed_int, default=42, help="seed of init, data order and dropout")
    g.add_argument("--length-buckets", type=nonneg_int, default=0, metavar="N",
                   help="sort windows by length within shuffled chunks of N batches, so batches pad less (0: plain "
                        "random batches; it also groups windows by label, see epoch_batches in tinyqa/train.py)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype on CUDA (fp16 adds a GradScaler); CPU always trains in fp32")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    if distill:
        g = p.add_argument_group("distillation")
        g.add_argument("--distillation-loss-weight", type=unit_float, default=defaults["distillation_loss_weight"],
                       help="w in w * T^2 * KL + (1 - w) * CE")
        g.add_argument("--temperature", type=positive_float, default=defaults["temperature"], help="T, softening both softmaxes")
        g.add_argument("--teacher-on-the-fly", action="store_true",
                       help="run the teacher per batch instead of caching its logits once")
        g.add_argument("--teacher-cache", default=None,
                       help="folder of cached teacher logits (default: $TINYQA_CACHE/teacher-logits, else "
                            "~/.cache/tinyqa/teacher-logits)")
        g.add_argument("--teacher-batch-size", type=positive_int, default=64, help="windows per teacher forward pass")
        g = p.add_argument_group("intermediate stage (TinyBERT; loss = e * L_embedding + h * sum L_hidden + "
                                 "a * sum L_attention over the mapped layers)")
        g.add_argument("--layer-map", type=parse_layer_map, default=None, metavar="T1,T2,...",
                       help="the 1-based teacher layer each student layer learns from, hidden state and attention "
                            "(default: uniform, layers k, 2k, ... with k = teacher layers / student layers)")
        g.add_argument("--embedding-loss-weight", type=nonneg_float, default=1.0, help="e: MSE of the embedding outputs")
        g.add_argument("--hidden-loss-weight", type=nonneg_float, default=1.0,
                       help="h: MSE of the mapped hidden states (the student's projected to the teacher's width)")
        g.add_argument("--attention-loss-weight", type=nonneg_float, default=1.0,
                       help="a: MSE of the mapped layers' pre-softmax attention scores")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--out", default=defaults["out"], help="output folder: final model, checkpoints, log.jsonl"
                   + (f" (intermediate: {INTERMEDIATE_DEFAULTS['out']})" if distill else ""))
    g.add_argument("--save-every", type=nonneg_int, default=1000, help="checkpoint every N optimizer steps (0: only at the end)")
    g.add_argument("--resume", metavar="CHECKPOINT_DIR",
                   help="continue a run from one of its checkpoints, in that run's folder and with its settings")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its log, checkpoints and final model are deleted)")
    g.add_argument("--keep-checkpoints", type=nonneg_int, default=3, metavar="N",
                   help="keep only the newest N checkpoints (0: keep all)")
    g.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop after N optimizer steps as if killed (the schedule stays that of the full run)")
    g.add_argument("--feature-store", default=None, metavar="DIR",
                   help="folder of featurized training windows, built once and reused (default: "
                        "$TINYQA_CACHE/features, else ~/.cache/tinyqa/features)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(distill=distill)
    return p


# --- small pieces

def get_lr_lambda(warmup_steps: int, total_steps: int):
    """LinearWarmup: lr factor rising 0 -> 1 over warmup_steps, then falling linearly to 0 at total_steps."""
    def f(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return f


def param_groups(model, weight_decay):
    """Weight decay on matrices only: biases and LayerNorm parameters are not shrunk (as in BERT)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # (the intermediate stage freezes the QA head)
            (no_decay if name.endswith(".bias") or ".ln" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def epoch_batches(seed, epoch, lengths, batch_size, bucket_batches=0):
    """The batches (lists of window indices) of one epoch, in order: a pure function of its arguments, so
    --resume needs no state. A seeded permutation of the windows cut into batches; with bucket_batches
    (--length-buckets) the permutation is first cut into chunks of bucket_batches * batch_size windows, each
    chunk sorted by length, cut into batches, and its batches shuffled: a batch then pads to a length close
    to its windows' own and no epoch sorts a million windows. Every chunk but the last holds whole batches,
    so there are ceil(n / batch_size) batches either way.
    Off by default because it changes what a batch holds, not only its padding: windows of equal length
    are mostly the questions of one context (SQuAD has ~4.6 per context) or, in long contexts, full-length
    windows without the answer (label 0), so sorting by length also groups by context and by label, and a
    batch sees fewer contexts. Measured: all-MiniLM-L6-v2 fine-tuned on 2,000 SQuAD questions (1 epoch,
    lr 3e-4, batch 32), held-out F1 31.1 with random batches, 18.6 with chunks of 50 batches; the synthetic
    data of tests/test_train.py (2 x 128 teacher, 6 epochs, seeds 42 and 7): F1 32.9 and 26.1 random, 24.3
    and 21.0 with chunks of 8 batches, 18.9 and 19.0 with 50."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=g)
    if not bucket_batches:
        return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    lengths = torch.as_tensor(np.asarray(lengths))
    chunk, batches = bucket_batches * batch_size, []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[torch.sort(lengths[part], stable=True).indices]  # (chunk,) by length, ties in random order
        cut = [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]
        batches += [cut[i] for i in torch.randperm(len(cut), generator=g).tolist()]
    return batches


# What each stage's loss is made of, logged beside "loss" in log.jsonl.
LOSS_PARTS = {"finetune": ("ce_loss",), "prediction": ("kd_loss", "ce_loss"),
              "intermediate": ("embedding_loss", "hidden_loss", "attention_loss")}
# Flags that only one distillation stage reads: naming one in the other stage is refused, not ignored.
STAGE_FLAGS = {"prediction": ("distillation_loss_weight", "temperature", "teacher_on_the_fly", "teacher_cache",
                              "teacher_batch_size"),
               "intermediate": ("layer_map", "embedding_loss_weight", "hidden_loss_weight", "attention_loss_weight")}


def stage_of(args) -> str:
    return getattr(args, "stage", "prediction") if args.distill else "finetune"


def diverged(step, first, sums, args, last_checkpoint):
    """The error for a loss that is NaN or infinite, naming the flags that usually cause it. At a run's first
    step no update has happened yet, so there the learning rate cannot be the cause."""
    flag = "--init-config" if args.init_config else "--student" if args.distill else "--model"
    causes = [f"the initial weights ({flag})" if first else f"--lr {args.lr} too high"]
    if stage_of(args) == "prediction":
        causes.append(f"--temperature {args.temperature} too small")
    if args.precision == "fp16" and args.device.startswith("cuda"):
        causes.append("--precision fp16 overflowing (use bf16 or fp32)")
    parts = ", ".join(f"{name} {x:.4g}" for name, x in zip(LOSS_PARTS[stage_of(args)], sums[1:].tolist()))
    return TinyQAError(f"step {step}: the loss is {sums[0].item():.4g} ({parts}): training diverged and was stopped "
                       f"before the weights were changed; likely {', or '.join(causes)}. "
                       f"{'Last checkpoint: ' + last_checkpoint if last_checkpoint else 'No checkpoint was saved'}")


# --- before any work

def apply_stage(args):
    """A new distillation run: the intermediate stage's defaults where the command line named nothing, and
    flags that the chosen stage would not read refused (a silently ignored --temperature misleads)."""
    if not args.distill:
        return
    given = set(getattr(args, "given", None) or ())
    for stage, names in STAGE_FLAGS.items():
        wrong = [n for n in names if n in given and stage != args.stage]
        if wrong:
            raise TinyQAError(f"--{wrong[0].replace('_', '-')} is read by --stage {stage} only, and this run is "
                              f"--stage {args.stage}: drop it, or change --stage")
    if args.stage == "intermediate":
        for k, v in INTERMEDIATE_DEFAULTS.items():
            if k not in given:
                setattr(args, k, v)
    if args.student_layers and ("student" in given or args.init_config):
        raise TinyQAError("--student-layers makes the student from the teacher's layers: drop "
                          f"{'--student' if 'student' in given else '--init-config'}, or --student-layers")


def check_run(args, distill):
    """Every check that needs neither weights nor training data, so a mistake costs seconds, not a teacher
    pass over 516k questions. Returns the local folders of the init weights, tokenizer and teacher."""
    check_device(args.device)
    check_featurizer(args.max_seq_len, args.doc_stride, args.max_query_length)
    check_input_files(args.train, "--train")
    check_input_files(args.eval_data, "--eval-data")
    if args.init_config and not args.resume:
        check_input_files([args.init_config], "--init-config")
    check_output_dir(args.out, "--out")
    if not args.resume:
        check_fresh_out(args.out, args.overwrite)
    flag, name = ("--student", args.student) if distill else ("--model", args.model)
    from_teacher = distill and args.student_layers and not args.resume

    def resolve(name, flag, **what):
        if flag == "--model" and name == FINETUNE_CARD["model"] and not os.path.isdir(name):
            raise TinyQAError(f"--model {name}: no such directory (the default, where train_distill.py writes "
                              "its model: run it first, or pass --model)")
        return resolve_dir(name, flag=flag, **what)

    dirs = {"init": args.resume}  # on --resume, the weights and the tokenizer come from the checkpoint
    if distill:
        dirs["teacher"] = resolve_dir(args.teacher, model=True, tokenizer=True, flag="--teacher")
    if not args.resume and not args.init_config and not from_teacher:
        dirs["init"] = resolve(name, flag, model=True, tokenizer=False)
    if args.resume:
        dirs["tokenizer"] = args.resume
    elif args.tokenizer:
        dirs["tokenizer"] = resolve(args.tokenizer, "--tokenizer", model=False, tokenizer=True)
    elif from_teacher:  # a student made of the teacher's layers speaks the teacher's tokenizer
        dirs["tokenizer"] = dirs["teacher"]
    else:
        dirs["tokenizer"] = resolve(name, flag, model=False, tokenizer=True)
    return dirs


def check_models(args, dirs, distill):
    """The trained model's config and tokenizer, checked against the windows and each other (and the
    teacher); in the intermediate stage also the layer map. Returns (config, tokenizer, layer map or None)."""
    teacher_cfg = load_model_config(dirs["teacher"]) if distill else None
    if dirs["init"]:
        cfg = load_model_config(dirs["init"])
    elif args.init_config:
        try:
            cfg = EncoderConfig.from_json(args.init_config)  # any family, from its model_type
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
            raise TinyQAError(f"--init-config {args.init_config}: {e}")
    else:  # --student-layers: the teacher's config with fewer layers
        uniform_layer_map(teacher_cfg.num_hidden_layers, args.student_layers, " (--student-layers)")  # or refused
        cfg = replace(teacher_cfg, num_hidden_layers=args.student_layers)
    tokenizer = load_tokenizer(dirs["tokenizer"])
    # now that the tokenizer says how many special tokens a window has: the exact room for context
    check_featurizer(args.max_seq_len, args.doc_stride, args.max_query_length, pair_layout(tokenizer).n_special)
    check_model_fits(cfg, tokenizer, args.max_seq_len, "the trained model")  # window, vocabulary, pad id, types
    layer_map = None
    if distill:
        # Teacher and student may be of different families (BERT -> ELECTRA, ...) as long as they share a tokenizer.
        check_model_fits(teacher_cfg, tokenizer, args.max_seq_len, f"the teacher {args.teacher}")
        if tokenizer_fingerprint(load_tokenizer(dirs["teacher"])) != tokenizer_fingerprint(tokenizer):
            init = args.tokenizer or args.student
            raise TinyQAError(f"teacher {args.teacher} and student {init} do not share a tokenizer: distillation "
                              "compares logits position by position, so both must tokenize identically")
        if stage_of(args) == "intermediate":
            layer_map = check_layer_map(teacher_cfg, cfg, args.layer_map)
    return cfg, tokenizer, layer_map


def build_model(args, cfg, dirs, master):
    """The model to train (seeded), and what really initialised it, for args.json."""
    if args.resume:  # the weights come from the checkpoint; args.init from its args.json
        return load_model(args.resume, verbose=False), getattr(args, "init", None)
    if args.init_config:
        return EncoderForQA(cfg), {"weights": f"random, seed {args.seed}", "config": os.path.abspath(args.init_config),
                                   "tokenizer": os.path.abspath(dirs["tokenizer"])}
    if args.distill and args.student_layers:
        model, layers = student_from_teacher_layers(load_model(dirs["teacher"], verbose=False), args.student_layers)
        return model, {"weights": f"the teacher's embeddings, layers {layers} (1-based) and QA head",
                       "teacher": os.path.abspath(dirs["teacher"]), "tokenizer": os.path.abspath(dirs["tokenizer"])}
    name = args.student if args.distill else args.model
    return load_model(dirs["init"], verbose=master), {"weights": os.path.abspath(dirs["init"]), "name": name,
                                                      "tokenizer": os.path.abspath(dirs["tokenizer"])}


def setup_distributed(args):
    """(world, rank, device): torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = args.device
    if world > 1:
        cuda = device.startswith("cuda")
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    if args.batch_size % world:
        raise TinyQAError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    return world, rank, device


def teacher_logits(args, train_files, teacher_dir, store, tokenizer, fcfg, device, autocast, amp_dtype, rank, world,
                   log):
    """The teacher-logit cache for the store's windows: reused when the key matches, else computed once.
    Rank 0 takes the lock (a second run wanting the same cache waits for it) and reserves the file; then
    every rank computes its share of the batches into it, and rank 0 renames it into place."""
    root = args.teacher_cache or teacher_cache.default_root()
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise TinyQAError(f"--teacher-cache {root}: cannot create it ({e.strerror})")
    key, info = teacher_cache.cache_key(root, train_files, teacher_dir, tokenizer_fingerprint(tokenizer), fcfg,
                                        args.limit, args.skip_bad, amp_dtype)
    folder = os.path.join(root, key)
    with ExitStack() as held:
        tmp = [None]
        if rank == 0 and not teacher_cache.is_complete(folder):
            held.enter_context(teacher_cache.lock(folder + ".lock", log))
            if not teacher_cache.is_complete(folder):  # another run may have finished it while we waited
                log(f"computing teacher logits once into {folder}" + (f" ({world} processes)" if world > 1 else ""))
                tmp = [teacher_cache.start(folder, store.lengths)]
        if world > 1:
            dist.broadcast_object_list(tmp, src=0)  # every rank learns whether, and where, to compute
        if tmp[0] is None:
            log(f"teacher logits: reusing {folder}")
        else:
            try:
                teacher = load_model(teacher_dir, device=device, verbose=rank == 0)
                batches = length_sorted_batches(store.lengths, args.teacher_batch_size, max_tokens_for(device))
                teacher_cache.compute(teacher, store, tmp[0], batches[rank::world], device, autocast,
                                      progress=rank == 0 and not args.quiet)
                del teacher
                if world > 1:
                    dist.barrier()  # every share is written
                if rank == 0:
                    teacher_cache.finish(tmp[0], folder, store.lengths, info)
            finally:
                if rank == 0:
                    shutil.rmtree(tmp[0], ignore_errors=True)  # gone already unless something failed
    if world > 1:
        dist.barrier()  # the cache is complete for every rank
    return teacher_cache.TeacherCache(folder, store.lengths)


# --- what one micro-batch optimises, per stage

class TeacherClock:
    """Seconds spent in the teacher's forward passes (the intermediate stage runs it per batch): reported
    with the peak memory at the end of the run and per step in log.jsonl."""

    def __init__(self, device):
        self.cuda, self.seconds, self.step_seconds = torch.device(device).type == "cuda", 0.0, 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - self.t
        self.seconds += dt
        self.step_seconds += dt


def make_objective(args, stage, teacher, cache, layer_map, clock):
    """loss_fn(model, batch, idx) -> (loss, parts): the loss of one micro-batch of this stage, and its
    parts (LOSS_PARTS[stage]) as a 1-d tensor for the log."""
    def span(model, b, idx):
        out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        ce = span_ce_loss(out.start_logits, out.end_logits, b["start_positions"], b["end_positions"],
                          b["attention_mask"])
        return ce, ce[None]

    def prediction(model, b, idx):
        out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        if cache is not None:
            t_start, t_end = (x.to(out.start_logits.device) for x in cache.batch(idx, b["input_ids"].shape[1]))
        else:
            with torch.no_grad(), clock:
                t_out = teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            t_start, t_end = t_out.start_logits, t_out.end_logits
        loss, kd, ce = distillation_loss(out.start_logits, out.end_logits, t_start, t_end, b["start_positions"],
                                         b["end_positions"], b["attention_mask"], args.distillation_loss_weight,
                                         args.temperature)
        return loss, torch.stack([kd, ce])

    def intermediate(model, b, idx):  # model: the ProjectedStudent (inside DDP)
        with clock:
            t_hidden, t_scores = teacher_targets(teacher, layer_map, b["input_ids"], b["attention_mask"],
                                                 b["token_type_ids"])
        s_hidden, s_scores = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        weights = (args.embedding_loss_weight, args.hidden_loss_weight, args.attention_loss_weight)
        loss, emb, hid, att = intermediate_loss(s_hidden, t_hidden, s_scores, t_scores, b["attention_mask"], weights)
        return loss, torch.stack([emb, hid, att])

    return {"finetune": span, "prediction": prediction, "intermediate": intermediate}[stage]


def forward_backward(args, ddp, scaler, autocast, store, global_idx, rank, world, device, loss_fn, n_parts):
    """Forward and backward of one optimizer step's windows (this rank's share, in --grad-accum micro-
    batches); returns the step's (loss, *parts), weighted by each micro-batch's share of the batch."""
    rank_idx = global_idx[rank::world]
    # Micro-batches take this share's windows in order of length, so each pads only to its own longest
    # window: the step's gradient is the same weighted sum whatever the split, but SQuAD-like data (a
    # few 384-token windows among many short ones) pays for far less padding (measured in the README).
    order = np.argsort(store.offsets[np.add(rank_idx, 1)] - store.offsets[rank_idx], kind="stable")
    micro = [[rank_idx[k] for k in part] for part in np.array_split(order, args.grad_accum)]
    sums = torch.zeros(1 + n_parts)  # the loss and its parts: weighted sums for logging
    for j, idx in enumerate(micro):
        # A process with nothing left in the last batch still runs a zero-weighted pass: DDP needs
        # every rank to reach the same all-reduces.
        weight = len(idx) / len(global_idx) * world
        idx = idx or global_idx[:1]
        batch = store.batch(idx, ddp_config(ddp).pad_token_id)  # read from the on-disk store
        batch = {k: v.to(device) for k, v in batch.items()}
        sync = ddp.no_sync() if world > 1 and j < len(micro) - 1 else nullcontext()
        with sync:
            with autocast:
                loss, parts = loss_fn(ddp, batch, idx)
            scaler.scale(loss * weight).backward()
        sums += torch.cat([loss.detach()[None], parts.detach()]).float().cpu() * weight / world
    return sums


def ddp_config(ddp):
    """The config of the model inside a DistributedDataParallel wrapper, or of the model itself."""
    return getattr(ddp, "module", ddp).config


def stop_requested(stop, world):
    """Whether Ctrl-C / SIGTERM arrived; with DDP, on any rank (every rank must checkpoint at the same step)."""
    flag = torch.tensor([stop.received is not None], dtype=torch.int32)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def peak_memory(device) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on {device}"
    try:
        with open("/proc/self/status") as f:  # VmHWM: this process's peak resident memory
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return f"{kb / 2**20:.2f} GiB resident (VmHWM)"
    except (OSError, StopIteration):
        return "unknown"


# --- the loop

@dataclass
class Run:
    """What the loop works with, set up by train(): the run's arguments, the model being trained (and what
    the optimizer and DDP see: the model, or the model with TinyBERT's projection), the data, the loss."""
    args: argparse.Namespace
    stage: str
    model: EncoderForQA
    trained: torch.nn.Module
    ddp: torch.nn.Module
    tokenizer: object
    store: FeatureStore
    loss_fn: object
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    autocast: object
    device: str
    rank: int
    world: int
    log: object
    clock: TeacherClock
    eval_examples: list
    fcfg: FeaturizerConfig
    last_checkpoint: str = None

    @property
    def master(self):
        return self.rank == 0


def train(args):
    """Run train_distill.py's or train_finetune.py's command line (args from build_parser) and return the
    trained model: checks, model, data, teacher and optimizer, then the loop."""
    distill = args.distill
    if args.resume:
        args = resume_args(args)
    else:
        apply_stage(args)
    stage = stage_of(args)
    dirs = check_run(args, distill)
    cfg, tokenizer, layer_map = check_models(args, dirs, distill)
    world, rank, device = setup_distributed(args)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if amp_dtype is not None and not device.startswith("cuda"):
        log(f"notice: --precision {args.precision} applies on CUDA only; training in fp32 on {device}")
        amp_dtype = None
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
    eval_examples = None
    if args.eval_data:  # read now: a bad file fails here, not after the first epoch
        eval_examples = [ex for _, _, exs in read_files(args.eval_data, skip_bad=args.skip_bad, flag="--eval-data")
                         for ex in exs]

    # --- model: built first, right after seeding, so nothing later (a teacher, a cache) shifts the RNG
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    model, args.init = build_model(args, cfg, dirs, master)
    model.float().to(device).train()
    trained = model  # what the optimizer and DDP see: the intermediate stage adds TinyBERT's projection
    if stage == "intermediate":
        # The QA head takes no part in this stage's loss: frozen, so that it is neither decayed nor left
        # without a gradient for DDP to wait on. The prediction-layer stage trains it.
        model.qa_outputs.requires_grad_(False)
        trained = ProjectedStudent(model, load_model_config(dirs["teacher"]).hidden_size).to(device)

    # --- data: featurized once into the on-disk store (the first process builds it, all read it)
    train_files = args.train or split_files("train", progress=master and not args.quiet, flag="--train")
    fcfg = FeaturizerConfig(args.max_seq_len, args.doc_stride, args.max_query_length)
    store = open_store(args.feature_store or store_root(), train_files, tokenizer, fcfg, args.limit, args.skip_bad,
                       log, progress=master and not args.quiet)
    log(f"{store.info['examples']} questions -> {len(store)} windows; model {model.num_params() / 1e6:.1f}M parameters")

    # --- teacher: in a forked RNG, so that loading it (or not, when its logits are cached) changes nothing
    teacher = cache = None
    if distill:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.startswith("cuda") else []):
            if args.stage == "intermediate" or args.teacher_on_the_fly:
                teacher = load_model(dirs["teacher"], device=device, verbose=master)
            else:
                cache = teacher_logits(args, train_files, dirs["teacher"], store, tokenizer, fcfg, device,
                                       autocast, amp_dtype, rank, world, log)
    if layer_map:
        log(f"intermediate stage: student layers 1..{len(layer_map)} learn teacher layers {layer_map}; projection "
            f"{trained.project if cfg.hidden_size != teacher.config.hidden_size else 'none (same width)'}")
    clock = TeacherClock(device)

    # --- optimizer, schedule, and on --resume the state they had
    steps_per_epoch = math.ceil(len(store) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(param_groups(trained, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = LambdaLR(optimizer, get_lr_lambda(int(args.warmup_proportion * total_steps), total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start_step = 0
    if args.resume:
        state = load_training_state(args.resume)
        if state["n_features"] != len(store):
            raise TinyQAError(f"{args.resume}: the checkpoint was trained on {state['n_features']} windows but the "
                              f"data now gives {len(store)}: resume with the same --train files and settings")
        if trained is not model:
            trained.project.load_state_dict(state["projection"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        start_step = state["step"]
        log(f"resuming at step {start_step} of {total_steps} in {args.out}")
    ddp = torch.nn.parallel.DistributedDataParallel(trained) if world > 1 else trained
    run = Run(args, stage, model, trained, ddp, tokenizer, store, make_objective(args, stage, teacher, cache, layer_map, clock),
              optimizer, scheduler, scaler, autocast, device, rank, world, log, clock, eval_examples, fcfg, args.resume)

    # --- the run folder: only now, with every check passed, is an --overwrite'd run removed
    if master:
        if args.resume:
            restart_log(args.out, start_step, steps_per_epoch)
        elif args.overwrite:
            clear_run(args.out)
    t_start = time.perf_counter()
    loop(run, start_step, steps_per_epoch, total_steps)
    if teacher is not None and master:
        total = time.perf_counter() - t_start
        log(f"teacher forward passes: {clock.seconds:.1f} s of {total:.1f} s ({100 * clock.seconds / max(total, 1e-9):.0f}%); "
            f"peak memory {peak_memory(device)}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return model


def loop(run, start_step, steps_per_epoch, total_steps):
    """The optimizer steps from start_step to the end: forward/backward, the NaN guard, the update,
    log.jsonl, checkpoints, evaluation after each epoch, and stopping on --stop-after or a signal."""
    from tqdm import tqdm
    args, stage = run.args, run.stage
    parts = LOSS_PARTS[stage]
    log_file = RunLog(os.path.join(args.out, "log.jsonl"), append=bool(args.resume)) if run.master else None
    bar = tqdm(total=total_steps, initial=start_step, desc="distill" if args.distill else "finetune",
               disable=not run.master or args.quiet)
    lengths = run.store.lengths
    batches, batches_epoch = None, -1
    t_last, n_last = time.perf_counter(), 0
    try:
        with StopSignal() as stop:
            for step in range(start_step, total_steps):
                epoch, pos = divmod(step, steps_per_epoch)
                if epoch != batches_epoch:
                    batches, batches_epoch = epoch_batches(args.seed, epoch, lengths, args.batch_size,
                                                           args.length_buckets), epoch
                global_idx = batches[pos]
                sums = forward_backward(args, run.ddp, run.scaler, run.autocast, run.store, global_idx, run.rank,
                                        run.world, run.device, run.loss_fn, len(parts))
                if run.world > 1:
                    dist.all_reduce(sums)
                if not torch.isfinite(sums).all():  # before the optimizer step: the weights stay as they were
                    raise diverged(step + 1, step == 0, sums, args, run.last_checkpoint)
                run.scaler.unscale_(run.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(run.trained.parameters(), args.max_grad_norm)
                if not run.scaler.is_enabled() and not torch.isfinite(grad_norm):  # fp16's scaler skips such steps
                    raise diverged(step + 1, step == 0, sums, args, run.last_checkpoint)
                run.scaler.step(run.optimizer)
                run.scaler.update()
                lr = run.scheduler.get_last_lr()[0]
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
                n_last += len(global_idx)

                # --- logging, checkpoints, evaluation, stopping
                if run.master:
                    now = time.perf_counter()
                    row = {"step": step + 1, "loss": round(sums[0].item(), 5),
                           **{name: round(x, 5) for name, x in zip(parts, sums[1:].tolist())},
                           "lr": lr, "examples_per_s": round(n_last / (now - t_last), 2)}
                    if stage == "intermediate" or getattr(args, "teacher_on_the_fly", False):
                        row["teacher_s"] = round(run.clock.step_seconds, 4)
                    log_file.write(row)
                    t_last, n_last, run.clock.step_seconds = now, 0, 0.0
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}",
                                    **{name.removesuffix("_loss"): f"{row[name]:.3f}" for name in parts})
                    bar.update(1)
                last = step + 1 == total_steps
                if args.save_every and (step + 1) % args.save_every == 0 and not last:
                    checkpoint(run, step + 1)
                if run.eval_examples and run.master and pos == steps_per_epoch - 1:
                    evaluate_epoch(run.model, run.tokenizer, run.eval_examples, run.fcfg, run.device, epoch, run.log,
                                   log_file)
                if args.stop_after is not None and step + 1 == args.stop_after and not last:
                    folder = checkpoint(run, step + 1)
                    run.log(f"stopped after step {step + 1} (--stop-after); continue with --resume {folder}")
                    break
                if stop_requested(stop, run.world) and not last:
                    folder = checkpoint(run, step + 1)
                    bar.close()
                    print(f"{stop.received}: saved {folder} after step {step + 1}; continue with --resume {folder}",
                          file=sys.stderr, flush=True)
                    raise KeyboardInterrupt
            else:
                if run.master:
                    save_final(args.out, run.model, run.tokenizer, args)
                run.log(f"saved {args.out}")
    finally:
        bar.close()
        if log_file:
            log_file.close()


def checkpoint(run, step):
    """checkpoint-STEP after `step` optimizer steps (every rank calls this: the RNG states are gathered)."""
    all_rng = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(all_rng, rng_states())
    else:
        all_rng = [rng_states()]
    state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "scaler": run.scaler.state_dict(), "rng": all_rng, "step": step, "n_features": len(run.store)}
    if run.trained is not run.model:  # TinyBERT's projection: trained, but not part of the saved student
        state["projection"] = run.trained.project.state_dict()
    folder = os.path.join(run.args.out, f"checkpoint-{step}")
    if run.master:
        save_checkpoint(folder, run.model, run.tokenizer, run.args, state)
        prune_checkpoints(run.args.out, run.args.keep_checkpoints)
    run.last_checkpoint = folder
    return folder


def evaluate_epoch(model, tokenizer, examples, fcfg, device, epoch, log, log_file):
    from .infer import predict
    from .metrics import score_datasets
    by_dataset = {}
    for ex in examples:
        by_dataset.setdefault(ex.dataset, []).append(ex)
    model.eval()
    preds = predict(model, tokenizer, examples, fcfg, device=device)
    model.train()
    m = score_datasets({q: p.text for q, p in preds.items()}, by_dataset)
    log(f"epoch {epoch + 1}: EM {m['macro']['exact_match']:.2f} F1 {m['macro']['f1']:.2f} (macro over {len(by_dataset)} datasets)")
    if log_file:
        log_file.write({"epoch": epoch + 1, "eval": m})
