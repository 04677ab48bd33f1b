"""The one training loop behind train_distill.py and train_finetune.py: `train(args)`, then the loop it runs.

Notable:
- one optimizer step sees `--batch-size` windows in all (the card's 96), split over DDP ranks and then
  over `--grad-accum` micro-batches (grouped by window length, so each pads less); each micro-batch's mean
  loss is weighted by its share of the global batch, so 1 GPU x 4 accumulation steps and 4 GPUs x 1
  optimise the same thing;
- what a step optimises is one plain function per stage (`span_objective`, `prediction_objective`,
  `intermediate_objective`, `minilmv2_objective`); the losses themselves are tinyqa/losses.py's;
- AdamW (no decay on biases and LayerNorm), clipping at 1.0, LinearWarmup through LambdaLR;
- the training windows come from the on-disk feature store (tinyqa/store.py), the teacher's logits from
  its cache beside it (tinyqa/teacher_cache.py), or from the teacher per batch (--teacher-on-the-fly);
- HF-layout checkpoints with the resolved arguments and the training state beside them, so that
  `--resume DIR` continues bit for bit (data order is a function of seed and epoch, RNG states saved);
  Ctrl-C or SIGTERM saves one before exiting (tinyqa/runs.py);
- everything checkable is checked before any work (tinyqa/preflight.py); a loss that turns NaN or infinite
  stops the run naming the step, and nothing broken is saved;
- `torchrun --nproc-per-node N` runs DistributedDataParallel (tinyqa/distributed.py).
"""
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from . import distributed
from .data import read_files
from .catalog import quiet_downloads, split_files
from .errors import TinyQAError
from .features import FeaturizerConfig
from .intermediate import ProjectedStudent, teacher_targets
from .losses import distillation_loss, intermediate_loss, minilm_loss, span_ce_loss
from .minilm import RelationStudent, capture_qkv
from .preflight import build_model, preflight, stage_of
from .runs import (RunLog, StopSignal, auto_resume, check_same_start, clear_run, kill_hook_for_tests,
                   load_training_state, prune_checkpoints, restart_log, resume_args, rng_states, save_checkpoint,
                   save_final, saved_args, set_rng_states)
from .store import default_root as store_root
from .store import open_store
from .teacher_cache import default_root as cache_root
from .teacher_cache import open_cache
from .token_map import TokenBridge
from .weights import load_model, load_model_config

# What each stage's loss is made of, logged beside "loss" in log.jsonl.
LOSS_PARTS = {"finetune": ("ce_loss",), "prediction": ("kd_loss", "ce_loss"),
              "intermediate": ("embedding_loss", "hidden_loss", "attention_loss"),
              "minilmv2": ("qq_loss", "kk_loss", "vv_loss")}


class Optim(NamedTuple):
    """How the weights are updated: AdamW, its LinearWarmup schedule, and the precision of the steps
    (autocast on CUDA; fp16 adds a GradScaler, otherwise a disabled one)."""
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    autocast: object


class Objective(NamedTuple):
    """What a step optimises: loss(model, batch, window indices) -> (loss, its parts as a 1-d tensor), the
    parts' names for the log, and the clock of the teacher's forward passes when it runs per batch."""
    loss: object
    parts: tuple
    clock: "TeacherClock"


def train(args):
    """Run a training command line (tinyqa/cli.py's distill_args or finetune_args) and return the trained
    model: checks, model, data, teacher and optimizer, then the loop."""
    if args.resume == "auto":  # a torchrun restart: the newest checkpoint in --out, else a fresh start
        args = auto_resume(args)
    if args.resume:
        args = resume_args(args)
    if args.quiet:
        quiet_downloads()
    stage = stage_of(args)
    plan = preflight(args)
    dist = distributed.init(args.device)
    check_same_start(dist, args)
    if args.batch_size % dist.world:
        raise TinyQAError(f"--batch-size {args.batch_size} is not divisible by the {dist.world} processes")
    log = print if dist.master else (lambda *a, **k: None)
    amp_dtype = autocast_dtype(args, dist.device, log)
    eval_examples = None
    if args.eval_data:  # read now: a bad file fails here, not after the first epoch
        eval_examples = [ex for _, _, exs in read_files(args.eval_data, skip_bad=args.skip_bad, flag="--eval-data")
                         for ex in exs]

    # --- model: built first, right after seeding, so nothing later (a teacher, a cache) shifts the RNG
    seed_everything(args.seed)
    model, args.init = build_model(args, plan, verbose=dist.master)
    model.float().to(dist.device).train()
    trained = stage_module(stage, model, plan, dist.device)

    # --- data: featurized once into the on-disk store (the first process builds it, all read it)
    train_files = args.train or split_files("train", progress=dist.master and not args.quiet, flag="--train")
    fcfg = FeaturizerConfig(args.max_seq_len, args.doc_stride, args.max_question_len)
    store = open_store(args.feature_store or store_root(), train_files, plan.tokenizer, fcfg, args.limit,
                       args.skip_bad, log, progress=dist.master and not args.quiet, vocab_size=plan.config.vocab_size)
    log(f"{store.info['examples']} questions -> {len(store)} windows; model {model.num_params() / 1e6:.1f}M parameters")

    # --- what a step optimises; the teacher in a forked RNG, so that loading it (or not, when its logits
    # are cached) changes nothing
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if dist.device.startswith("cuda") else []):
        objective = make_objective(args, stage, plan, store, amp_dtype, dist, log)

    # --- optimizer, schedule, and on --resume the state they had
    steps_per_epoch = math.ceil(len(store) / args.batch_size)
    optim = make_optim(args, trained, steps_per_epoch * args.epochs, amp_dtype)
    start_step = restore(args, optim, trained, len(store), dist.rank, log) if args.resume else 0
    ddp = torch.nn.parallel.DistributedDataParallel(trained) if dist.world > 1 else trained

    # --- the run folder: only now, with every check passed, is an --overwrite'd run removed
    if dist.master:
        if args.resume:
            restart_log(args.out, start_step, steps_per_epoch)
        elif args.overwrite:
            clear_run(args.out)
    save = partial(checkpoint, args, model, trained, plan.tokenizer, optim, dist, len(store))
    evaluate = partial(evaluate_epoch, model, plan.tokenizer, eval_examples, fcfg, dist.device, log) \
        if eval_examples and dist.master else None
    t_start = time.perf_counter()
    if loop(args, ddp, optim, objective, store, dist, start_step, save, evaluate) and dist.master:
        save_final(args.out, model, plan.tokenizer, args)
        log(f"saved {args.out}")
    clock = objective.clock
    if clock.active and dist.master:
        total = time.perf_counter() - t_start
        log(f"teacher forward passes: {clock.seconds:.1f} s of {total:.1f} s "
            f"({100 * clock.seconds / max(total, 1e-9):.0f}%); peak memory {peak_memory(dist.device)}")
    distributed.finish(dist)
    return model


def stage_module(stage, model, plan, device):
    """What the optimizer and DDP see: the model, or the stage's wrapper of it (the intermediate stage adds
    TinyBERT's projection; the minilmv2 stage returns its last layer's queries, keys and values)."""
    if stage == "intermediate":
        # The QA head takes no part in this stage's loss: frozen, so that it is neither decayed nor left
        # without a gradient for DDP to wait on. The prediction-layer stage trains it.
        model.qa_outputs.requires_grad_(False)
        return ProjectedStudent(model, load_model_config(plan.dirs["teacher"]).hidden_size).to(device)
    if stage == "minilmv2":
        return RelationStudent(model)
    return model


def loop(args, ddp, optim, objective, store, dist, start_step, save, evaluate):
    """The optimizer steps from start_step to the end: forward/backward, the NaN guard, the update,
    log.jsonl, checkpoints (save(step) -> folder), evaluation after each epoch (evaluate(epoch) -> metrics,
    None on ranks that do not evaluate), and stopping on a signal (KeyboardInterrupt after saving) or
    --stop-after. Returns whether the run reached its last step."""
    from tqdm import tqdm
    steps_per_epoch = math.ceil(len(store) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    log_file = RunLog(os.path.join(args.out, "log.jsonl"), append=bool(args.resume),
                      settings=saved_args(args)) if dist.master else None
    bar = tqdm(total=total_steps, initial=start_step, desc="distill" if args.distill else "finetune",
               disable=not dist.master or args.quiet)
    batches, batches_epoch, last_checkpoint = None, -1, None
    t_last, n_last = time.perf_counter(), 0
    try:
        with StopSignal() as stop:
            for step in range(start_step, total_steps):
                epoch, pos = divmod(step, steps_per_epoch)
                if epoch != batches_epoch:
                    batches, batches_epoch = epoch_batches(args.seed, epoch, store.lengths, args.batch_size,
                                                           args.length_buckets), epoch
                micro = micro_batches(store, batches[pos], dist, args.grad_accum, unwrap(ddp).config.pad_token_id)
                sums = distributed.all_reduce_sum(dist, backward(ddp, micro, objective, optim, dist))
                if not torch.isfinite(sums).all():  # before the optimizer step: the weights stay as they were
                    raise diverged(step + 1, step == 0, sums, args, last_checkpoint)
                optim.scaler.unscale_(optim.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(ddp.parameters(), args.max_grad_norm)
                if not optim.scaler.is_enabled() and not torch.isfinite(grad_norm):  # fp16's scaler skips such steps
                    raise diverged(step + 1, step == 0, sums, args, last_checkpoint)
                optim.scaler.step(optim.optimizer)
                optim.scaler.update()
                lr = optim.scheduler.get_last_lr()[0]
                optim.scheduler.step()
                optim.optimizer.zero_grad(set_to_none=True)
                n_last += len(batches[pos])

                # --- logging, checkpoints, evaluation, stopping
                if dist.master:
                    now = time.perf_counter()
                    log_file.write(log_row(step + 1, sums, objective, lr, n_last / (now - t_last), bar))
                    t_last, n_last = now, 0
                last = step + 1 == total_steps
                if args.save_every and (step + 1) % args.save_every == 0 and not last:
                    last_checkpoint = save(step + 1)
                kill_hook_for_tests(step + 1, dist.rank)
                if evaluate and pos == steps_per_epoch - 1:
                    log_file.write({"epoch": epoch + 1, "eval": evaluate(epoch)})
                if args.stop_after is not None and step + 1 == args.stop_after and not last:
                    folder = save(step + 1)
                    if dist.master:
                        print(f"stopped after step {step + 1} (--stop-after); continue with --resume {folder}")
                    return False
                if not last and distributed.any_rank(dist, stop.received is not None):
                    folder = save(step + 1)
                    bar.close()
                    print(f"{stop.received}: saved {folder} after step {step + 1}; continue with --resume {folder}",
                          file=sys.stderr, flush=True)
                    raise KeyboardInterrupt
        return True
    finally:
        bar.close()
        if log_file:
            log_file.close()


def log_row(step, sums, objective, lr, examples_per_s, bar) -> dict:
    """The step's row of log.jsonl (loss, its parts, lr, speed; the teacher's seconds when it runs per
    batch), also shown on the progress bar."""
    row = {"step": step, "loss": round(sums[0].item(), 5),
           **{name: round(x, 5) for name, x in zip(objective.parts, sums[1:].tolist())},
           "lr": lr, "examples_per_s": round(examples_per_s, 2)}
    if objective.clock.active:
        row["teacher_s"] = round(objective.clock.step_seconds, 4)
        objective.clock.step_seconds = 0.0
    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}",
                    **{name.removesuffix("_loss"): f"{row[name]:.3f}" for name in objective.parts})
    bar.update(1)
    return row


# --- one step: micro-batches, forward and backward

def micro_batches(store, global_idx, dist, grad_accum, pad_id) -> list:
    """This rank's share of one optimizer step's windows as (window indices, padded batch, weight) per
    micro-batch. Micro-batches take the share's windows in order of length, so each pads only to its own
    longest window: the step's gradient is the same weighted sum whatever the split, but SQuAD-like data (a
    few 384-token windows among many short ones) pays for far less padding. Each micro-batch's mean loss is
    weighted by its share of the global batch (times the world size, which DDP's averaging divides back)."""
    rank_idx = global_idx[dist.rank::dist.world]
    order = np.argsort(store.lengths[rank_idx], kind="stable")
    out = []
    for part in np.array_split(order, grad_accum):
        idx = [rank_idx[k] for k in part]
        weight = len(idx) / len(global_idx) * dist.world
        # A process with nothing left in the last batch still runs a zero-weighted pass: DDP needs every
        # rank to reach the same all-reduces.
        idx = idx or global_idx[:1]
        batch = {k: v.to(dist.device) for k, v in store.batch(idx, pad_id).items()}  # read from the on-disk store
        out.append((idx, batch, weight))
    return out


def backward(ddp, micro, objective, optim, dist) -> torch.Tensor:
    """Forward and backward of the micro-batches, gradients accumulated (DDP syncs only on the last);
    returns this rank's (loss, *parts) of the step, each micro-batch weighted by its share."""
    sums = torch.zeros(1 + len(objective.parts))
    for j, (idx, batch, weight) in enumerate(micro):
        sync = ddp.no_sync() if dist.world > 1 and j < len(micro) - 1 else nullcontext()
        with sync:
            with optim.autocast:
                loss, parts = objective.loss(ddp, batch, idx)
            optim.scaler.scale(loss * weight).backward()
        sums += torch.cat([loss.detach()[None], parts.detach()]).float().cpu() * weight / dist.world
    return sums


# --- what a micro-batch optimises, per stage

def span_objective(model, b, idx):
    """The span cross-entropy alone (train_finetune.py)."""
    out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    ce = span_ce_loss(out.start_logits, out.end_logits, b["start_positions"], b["end_positions"], b["attention_mask"])
    return ce, ce[None]


def prediction_objective(model, b, idx, teacher_logits, weight, temperature, probabilities=False):
    """The card's stage: KL to the teacher's start/end distributions at temperature T, plus the span CE.
    teacher_logits(batch, idx) -> (start, end) (B, L): from the cache, or the teacher run on the batch; with
    probabilities, the distributions of a teacher with another tokenizer, carried to the student's tokens."""
    out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    t_start, t_end = teacher_logits(b, idx)
    loss, kd, ce = distillation_loss(out.start_logits, out.end_logits, t_start.to(out.start_logits.device),
                                     t_end.to(out.end_logits.device), b["start_positions"], b["end_positions"],
                                     b["attention_mask"], weight, temperature, probabilities)
    return loss, torch.stack([kd, ce])


def intermediate_objective(model, b, idx, teacher, layer_map, weights, clock):
    """TinyBERT's first stage: the student's (projected) embeddings, hidden states and attention scores
    against the teacher's mapped layers. model: the ProjectedStudent (inside DDP)."""
    with clock:
        t_hidden, t_scores = teacher_targets(teacher, layer_map, b["input_ids"], b["attention_mask"],
                                             b["token_type_ids"])
    s_hidden, s_scores = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    loss, emb, hid, att = intermediate_loss(s_hidden, t_hidden, s_scores, t_scores, b["attention_mask"], weights)
    return loss, torch.stack([emb, hid, att])


def minilmv2_objective(model, b, idx, teacher, teacher_layer, heads, clock):
    """MiniLMv2's stage: the student's last layer learns one teacher layer's query-query, key-key and
    value-value relations. model: the RelationStudent (inside DDP), giving its last layer's (q, k, v)."""
    with clock, torch.no_grad(), capture_qkv(teacher, teacher_layer) as t_qkv:
        teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    s_qkv = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    loss, qq, kk, vv = minilm_loss(t_qkv, s_qkv, b["attention_mask"], heads)
    return loss, torch.stack([qq, kk, vv])


def make_objective(args, stage, plan, store, amp_dtype, dist, log) -> Objective:
    """The stage's objective with what it needs bound: the teacher (per batch) or its cached logits."""
    per_batch = stage in ("intermediate", "minilmv2") or getattr(args, "teacher_on_the_fly", False)
    clock = TeacherClock(dist.device, active=per_batch)
    if stage == "finetune":
        return Objective(span_objective, LOSS_PARTS[stage], clock)
    teacher = load_model(plan.dirs["teacher"], device=dist.device, verbose=dist.master) if per_batch else None
    if stage == "minilmv2":
        layer, heads = plan.relation
        log(f"minilmv2 stage: the student's last layer learns teacher layer {layer}'s relations, {heads} relation heads")
        return Objective(partial(minilmv2_objective, teacher=teacher, teacher_layer=layer, heads=heads, clock=clock),
                         LOSS_PARTS[stage], clock)
    if stage == "intermediate":
        log(f"intermediate stage: student layers 1..{len(plan.layer_map)} learn teacher layers {plan.layer_map}")
        weights = (args.embedding_loss_weight, args.hidden_loss_weight, args.attention_loss_weight)
        return Objective(partial(intermediate_objective, teacher=teacher, layer_map=plan.layer_map, weights=weights,
                                 clock=clock), LOSS_PARTS[stage], clock)
    probabilities = False
    if per_batch:
        def teacher_logits(b, idx):
            with torch.no_grad(), clock:
                out = teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            return out.start_logits, out.end_logits
    else:
        bridge = None
        if plan.teacher_tokenizer is not None:  # another tokenizer: its distributions carried to ours
            fcfg = FeaturizerConfig(args.max_seq_len, args.doc_stride, args.max_question_len)
            bridge = TokenBridge(plan.tokenizer, plan.teacher_tokenizer, fcfg,
                                 load_model_config(plan.dirs["teacher"]).max_window_len)
            log(f"the teacher {args.teacher} has another tokenizer: it reads each window's question and stretch of "
                "context in its own tokens, and its start/end distributions are carried to the student's")
        cache = open_cache(args.teacher_cache or cache_root(), store, plan.dirs["teacher"], amp_dtype,
                           args.teacher_batch_size, dist, log, progress=not args.quiet, bridge=bridge,
                           temperature=args.temperature)
        teacher_logits = lambda b, idx: cache.batch(idx, b["input_ids"].shape[1])  # noqa: E731
        probabilities = cache.probabilities
    return Objective(partial(prediction_objective, teacher_logits=teacher_logits,
                             weight=args.distillation_loss_weight, temperature=args.temperature,
                             probabilities=probabilities),
                     LOSS_PARTS[stage], clock)


class TeacherClock:
    """Seconds spent in the teacher's forward passes when it runs per batch: reported with the peak memory
    at the end of the run and per step in log.jsonl."""

    def __init__(self, device, active=True):
        self.cuda, self.active = torch.device(device).type == "cuda", active
        self.seconds = self.step_seconds = 0.0

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


# --- setting up: precision, seeds, optimizer, resuming

def autocast_dtype(args, device, log):
    """The autocast dtype of --precision: CUDA only (the CPU trains in fp32, with a notice)."""
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if amp_dtype is not None and not device.startswith("cuda"):
        log(f"notice: --precision {args.precision} applies on CUDA only; training in fp32 on {device}")
        return None
    return amp_dtype


def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def make_optim(args, trained, total_steps, amp_dtype) -> Optim:
    optimizer = torch.optim.AdamW(param_groups(trained, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = LambdaLR(optimizer, get_lr_lambda(int(args.warmup_proportion * total_steps), total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
    return Optim(optimizer, scheduler, scaler, autocast)


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


def restore(args, optim, trained, n_windows, rank, log) -> int:
    """--resume: the optimizer, schedule, scaler, RNG and (intermediate stage) projection as the checkpoint
    saved them; returns the step to continue from."""
    state = load_training_state(args.resume)
    if state["n_features"] != n_windows:
        raise TinyQAError(f"{args.resume}: the checkpoint was trained on {state['n_features']} windows but the "
                          f"data now gives {n_windows}: resume with the same --train files and settings")
    if isinstance(trained, ProjectedStudent):
        trained.project.load_state_dict(state["projection"])
    optim.optimizer.load_state_dict(state["optimizer"])
    optim.scheduler.load_state_dict(state["scheduler"])
    optim.scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    log(f"resuming at step {state['step']} in {args.out}")
    return state["step"]


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
    batch sees fewer contexts, which measured worse held-out F1 (docs/design.md)."""
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


# --- checkpoints, evaluation, and what the run reports

def checkpoint(args, model, trained, tokenizer, optim, dist, n_windows, step):
    """checkpoint-STEP after `step` optimizer steps (every rank calls this: the RNG states are gathered)."""
    state = {"optimizer": optim.optimizer.state_dict(), "scheduler": optim.scheduler.state_dict(),
             "scaler": optim.scaler.state_dict(), "rng": distributed.gather(dist, rng_states()), "step": step,
             "n_features": n_windows}
    if isinstance(trained, ProjectedStudent):  # TinyBERT's projection: trained, but not part of the saved student
        state["projection"] = trained.project.state_dict()
    folder = os.path.join(args.out, f"checkpoint-{step}")
    if dist.master:
        save_checkpoint(folder, model, tokenizer, args, state)
        prune_checkpoints(args.out, args.keep_checkpoints)
    return folder


def evaluate_epoch(model, tokenizer, examples, fcfg, device, log, epoch) -> dict:
    """EM/F1 on --eval-data after an epoch (macro over its datasets), logged; the model back in training mode."""
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
    return m


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


def unwrap(ddp):
    """The model inside a DistributedDataParallel wrapper (and TinyBERT's projection), or the model itself."""
    m = getattr(ddp, "module", ddp)
    return getattr(m, "student", m)


def peak_memory(device) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on {device}"
    try:
        with open("/proc/self/status") as f:  # VmHWM: this process's peak resident memory
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return f"{kb / 2**20:.2f} GiB resident (VmHWM)"
    except (OSError, StopIteration):
        return "unknown"
