"""The one training loop behind train_distill.py and train_finetune.py.

Notable:
- one optimizer step sees `--batch-size` windows in all (the card's 96), split over DDP ranks and then
  over `--grad-accum` micro-batches; each micro-batch's mean loss is weighted by its share of the global
  batch, so 1 GPU x 4 accumulation steps and 4 GPUs x 1 optimise the same thing;
- AdamW (no decay on biases and LayerNorm), clipping at 1.0, LinearWarmup through LambdaLR;
- teacher logits computed once into a float16 on-disk cache keyed by data + teacher + featurizer, or
  per batch with --teacher-on-the-fly;
- HF-layout checkpoints with the resolved arguments and the training state beside them, so that
  `--resume DIR` continues bit for bit (data order is a function of seed and epoch, RNG states saved);
- `torchrun --nproc-per-node N` runs DistributedDataParallel (nccl on GPU, gloo on CPU).
"""
import argparse
import hashlib
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from .errors import TinyQAError
from .features import FeaturizerConfig, check_model_fits, collate, featurize, length_sorted_batches
from .infer import max_tokens_for
from .losses import distillation_loss, span_ce_loss
from .model import EncoderConfig, EncoderForQA
from .mrqa import ReadReport, read_mrqa, split_files
from .tokenizer import load_tokenizer, tokenizer_fingerprint
from .weights import load_model, load_model_config, resolve_dir, save_pretrained

# Arguments that define the run; on --resume they come from the checkpoint, not the command line.
RUNTIME_ARGS = {"resume", "out", "save_every", "stop_after", "device", "quiet", "teacher_cache", "eval_data"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every flag's default (not the empty ones: None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


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
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--train", nargs="+", metavar="FILE",
                   help="MRQA .jsonl(.gz) training files (default: download the official MRQA train split)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N questions of each training file")
    g.add_argument("--skip-bad", action="store_true", help="skip malformed lines (counted and reported)")
    g.add_argument("--eval-data", nargs="+", metavar="FILE", help="MRQA files to score (EM/F1) after each epoch")
    g = p.add_argument_group("model")
    if distill:
        g.add_argument("--teacher", default=defaults["teacher"], help="teacher: alias, hub id or directory")
        g.add_argument("--student", default=defaults["student"],
                       help="student init: alias, hub id or directory (a base LM gets a fresh QA head)")
    else:
        g.add_argument("--model", default=defaults["model"], help="model to fine-tune: alias, hub id or directory")
    g.add_argument("--init-config", metavar="CONFIG_JSON",
                   help="start the trained model from random weights with this HF config.json instead")
    g.add_argument("--tokenizer", default=None, help="tokenizer (default: the trained model's own)")
    g = p.add_argument_group("featurizer")
    g.add_argument("--max-seq-len", type=int, default=384, help="tokens per window, special tokens included")
    g.add_argument("--doc-stride", type=int, default=128, help="overlap in tokens between consecutive windows")
    g.add_argument("--max-query-length", type=int, default=64, help="question tokens kept")
    g = p.add_argument_group("optimisation (model card defaults)")
    g.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="windows per optimizer step, all GPUs together")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (per process)")
    g.add_argument("--epochs", type=int, default=defaults["epochs"], help="passes over the training windows")
    g.add_argument("--lr", type=float, default=defaults["lr"], help="peak learning rate")
    g.add_argument("--warmup-proportion", type=float, default=defaults["warmup_proportion"],
                   help="fraction of the optimizer steps spent warming the lr up linearly from 0")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (none on biases, LayerNorm)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument("--seed", type=int, default=42, help="seed of init, data order and dropout")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype on CUDA (fp16 adds a GradScaler); CPU always trains in fp32")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    if distill:
        g = p.add_argument_group("distillation")
        g.add_argument("--distillation-loss-weight", type=float, default=defaults["distillation_loss_weight"],
                       help="w in w * T^2 * KL + (1 - w) * CE")
        g.add_argument("--temperature", type=float, default=defaults["temperature"], help="T, softening both softmaxes")
        g.add_argument("--teacher-on-the-fly", action="store_true",
                       help="run the teacher per batch instead of caching its logits once")
        g.add_argument("--teacher-cache", default=None,
                       help="folder of cached teacher logits (default: $TINYQA_CACHE/teacher-logits)")
        g.add_argument("--teacher-batch-size", type=int, default=64, help="windows per teacher forward pass")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--out", default=defaults["out"], help="output folder: final model, checkpoints, log.jsonl")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N optimizer steps (0: only at the end)")
    g.add_argument("--resume", metavar="CHECKPOINT_DIR", help="continue a run from one of its checkpoints")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after N optimizer steps as if killed (the schedule stays that of the full run)")
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
        (no_decay if name.endswith(".bias") or ".ln" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def epoch_order(seed, epoch, n):
    """The permutation of the n training windows in this epoch: a pure function, so --resume needs no state."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def read_examples(files, limit=None, skip_bad=False, log=print):
    report, examples = ReadReport(), []
    for path in files:
        n = 0
        for ex in read_mrqa(path, skip_bad=skip_bad, report=report):
            if limit is not None and n >= limit:
                break
            examples.append(ex)
            n += 1
    if report.skipped:
        log(f"skipped {len(report.skipped)} malformed line(s); first: {report.skipped[0]}")
    return examples


def file_fingerprint(paths):
    return [(os.path.abspath(p), os.path.getsize(p), int(os.path.getmtime(p))) for p in paths]


# --- teacher logits

def teacher_cache_key(args, train_files, teacher_dir, tok_fp):
    weights = [os.path.join(teacher_dir, f) for f in ("model.safetensors", "pytorch_model.bin", "config.json")
               if os.path.exists(os.path.join(teacher_dir, f))]
    key = {"data": file_fingerprint(train_files), "limit": args.limit, "teacher": file_fingerprint(weights),
           "tokenizer": tok_fp, "featurizer": [args.max_seq_len, args.doc_stride, args.max_query_length]}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20], key


@torch.inference_mode()
def compute_teacher_cache(teacher, features, folder, batch_size, device, autocast, progress):
    """Teacher start/end logits of every window, float16, flat on disk: logits[offsets[i]:offsets[i+1]]."""
    from tqdm import tqdm
    lengths = np.array([len(f.input_ids) for f in features], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    logits = np.lib.format.open_memmap(os.path.join(tmp, "logits.npy"), mode="w+", dtype=np.float16,
                                       shape=(int(offsets[-1]), 2))
    for idx in tqdm(length_sorted_batches(features, batch_size, max_tokens_for(device)),
                    desc="teacher logits", disable=not progress):
        batch = collate([features[i] for i in idx], pad_id=teacher.config.pad_token_id)
        with autocast:
            out = teacher(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                          batch["token_type_ids"].to(device))
        both = torch.stack([out.start_logits, out.end_logits], dim=-1).float().cpu().numpy()  # (B, L, 2)
        for row, i in enumerate(idx):
            logits[offsets[i]:offsets[i + 1]] = both[row, : lengths[i]]
    logits.flush()
    del logits
    np.save(os.path.join(tmp, "offsets.npy"), offsets)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # only a complete cache ever has the final name


class TeacherCache:
    def __init__(self, folder):
        self.logits = np.load(os.path.join(folder, "logits.npy"), mmap_mode="r")
        self.offsets = np.load(os.path.join(folder, "offsets.npy"))

    def batch(self, idx, L):
        """(start, end) float32 tensors (B, L) for the windows idx, zero beyond each window (masked anyway)."""
        out = np.zeros((len(idx), L, 2), dtype=np.float32)
        for row, i in enumerate(idx):
            a, b = self.offsets[i], self.offsets[i + 1]
            out[row, : b - a] = self.logits[a:b]
        t = torch.from_numpy(out)
        return t[..., 0], t[..., 1]


# --- checkpoints

def save_checkpoint(folder, model, tokenizer, args, state=None):
    """HF-layout model folder + args.json (+ training_state.pt for --resume). A checkpoint folder is
    written under a temporary name and renamed, so a kill never leaves a half-written checkpoint."""
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, tokenizer=tokenizer)
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    if state is not None:
        torch.save(state, os.path.join(tmp, "training_state.pt"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def save_final(out, model, tokenizer, args):
    """The final model straight into --out, beside log.jsonl and the checkpoints, which stay."""
    save_checkpoint(os.path.join(out, "final.tmpdir"), model, tokenizer, args)
    for name in os.listdir(os.path.join(out, "final.tmpdir")):
        os.replace(os.path.join(out, "final.tmpdir", name), os.path.join(out, name))
    os.rmdir(os.path.join(out, "final.tmpdir"))


def rng_states():
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_states(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def resume_args(args):
    """On --resume the run's own arguments come from the checkpoint; only runtime ones from the CLI."""
    path = os.path.join(args.resume, "args.json")
    if not os.path.exists(os.path.join(args.resume, "training_state.pt")) or not os.path.exists(path):
        raise TinyQAError(f"{args.resume}: not a training checkpoint (no training_state.pt / args.json)")
    with open(path) as f:
        saved = json.load(f)
    for k, v in saved.items():
        if k not in RUNTIME_ARGS:
            setattr(args, k, v)
    return args


# --- the loop

def train(args):
    distill = args.distill
    if args.resume:
        args = resume_args(args)
    # --- distributed: torchrun sets WORLD_SIZE / RANK / LOCAL_RANK
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = args.device
    if world > 1:
        cuda = device.startswith("cuda")
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    use_cuda = device.startswith("cuda")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if amp_dtype is not None and not use_cuda:
        log(f"notice: --precision {args.precision} applies on CUDA only; training in fp32 on {device}")
        amp_dtype = None
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
    if args.batch_size % world:
        raise TinyQAError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    # --- model and tokenizer
    init = args.student if distill else args.model
    tokenizer = load_tokenizer(args.tokenizer or init)
    if args.resume:  # the weights come from the checkpoint, whatever the init was
        model = load_model(args.resume, verbose=False)
    elif args.init_config:
        try:
            model = EncoderForQA(EncoderConfig.from_json(args.init_config))  # any family, from its model_type
        except (ValueError, TypeError, OSError) as e:
            raise TinyQAError(f"{args.init_config}: {e}")
    else:
        model = load_model(init, verbose=master)
    model.float().to(device).train()
    check_model_fits(model.config, tokenizer, args.max_seq_len, name=f"model {args.init_config or init}")

    # --- data
    train_files = args.train or split_files("train", progress=master and not args.quiet)
    examples = read_examples(train_files, args.limit, args.skip_bad, log)
    if not examples:
        raise TinyQAError(f"no training questions in {', '.join(train_files)}")
    fcfg = FeaturizerConfig(args.max_seq_len, args.doc_stride, args.max_query_length)
    features = featurize(examples, tokenizer, fcfg, with_labels=True, with_offsets=False)
    eval_examples = read_examples(args.eval_data, skip_bad=args.skip_bad, log=log) if args.eval_data else None
    log(f"{len(examples)} questions -> {len(features)} windows; model {model.num_params() / 1e6:.1f}M parameters")

    # --- teacher
    teacher = cache = None
    if distill:
        teacher_dir = resolve_dir(args.teacher, model=True, tokenizer=True)
        if tokenizer_fingerprint(load_tokenizer(teacher_dir)) != tokenizer_fingerprint(tokenizer):
            raise TinyQAError(f"teacher {args.teacher} and student {init} do not share a tokenizer: distillation "
                              "compares logits position by position, so both must tokenize identically")
        # Teacher and student may be of different families (BERT -> ELECTRA, ...) as long as they share it.
        check_model_fits(load_model_config(teacher_dir), tokenizer, args.max_seq_len, name=f"teacher {args.teacher}")
        if args.teacher_on_the_fly:
            teacher = load_model(teacher_dir, device=device, verbose=master)
        else:
            key, key_info = teacher_cache_key(args, train_files, teacher_dir, tokenizer_fingerprint(tokenizer))
            root = args.teacher_cache or os.path.join(os.environ.get("TINYQA_CACHE") or
                                                      os.path.expanduser("~/.cache/tinyqa"), "teacher-logits")
            folder = os.path.join(root, key)
            if master and not os.path.exists(os.path.join(folder, "offsets.npy")):
                log(f"computing teacher logits once into {folder}")
                t = load_model(teacher_dir, device=device, verbose=master)
                compute_teacher_cache(t, features, folder, args.teacher_batch_size, device, autocast,
                                      progress=not args.quiet)
                with open(os.path.join(folder, "key.json"), "w") as f:
                    json.dump(key_info, f, indent=2)
                del t
            elif master:
                log(f"teacher logits: reusing {folder}")
            if world > 1:
                dist.barrier()  # the other ranks wait for rank 0's cache
            cache = TeacherCache(folder)

    # --- optimizer and schedule
    steps_per_epoch = math.ceil(len(features) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = int(args.warmup_proportion * total_steps)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = LambdaLR(optimizer, get_lr_lambda(warmup_steps, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start_step = 0
    if args.resume:
        # our own file (it holds numpy/python RNG states, which weights_only refuses)
        state = torch.load(os.path.join(args.resume, "training_state.pt"), map_location="cpu", weights_only=False)
        if state["n_features"] != len(features):
            raise TinyQAError(f"{args.resume}: the checkpoint was trained on {state['n_features']} windows but the "
                              f"data now gives {len(features)}: resume with the same --train files and settings")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        start_step = state["step"]
        log(f"resuming at step {start_step} of {total_steps}")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def checkpoint(folder, with_state=True):
        state = None
        if with_state:
            all_rng = [None] * world
            if world > 1:
                dist.all_gather_object(all_rng, rng_states())
            else:
                all_rng = [rng_states()]
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng": all_rng, "step": step + 1, "n_features": len(features)}
        if master:
            save_checkpoint(folder, model, tokenizer, args, state)

    # --- loop
    from tqdm import tqdm
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    bar = tqdm(total=total_steps, initial=start_step, desc="distill" if distill else "finetune",
               disable=not master or args.quiet)
    order, order_epoch = None, -1
    t_last, n_last = time.perf_counter(), 0
    step = start_step - 1
    for step in range(start_step, total_steps):
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(args.seed, epoch, len(features)), epoch
        global_idx = order[pos * args.batch_size:(pos + 1) * args.batch_size]
        rank_idx = global_idx[rank::world]
        micro = [rank_idx[j::args.grad_accum] for j in range(args.grad_accum)]
        sums = torch.zeros(3)  # loss, kd, ce: weighted sums for logging
        for j, idx in enumerate(micro):
            # A process with nothing left in the last batch still runs a zero-weighted pass: DDP needs
            # every rank to reach the same all-reduces.
            weight = len(idx) / len(global_idx) * world
            idx = idx or global_idx[:1]
            batch = {k: v.to(device) for k, v in collate([features[i] for i in idx], with_labels=True,
                                                         pad_id=model.config.pad_token_id).items()}
            sync = ddp.no_sync() if world > 1 and j < len(micro) - 1 else nullcontext()
            with sync:
                with autocast:
                    out = ddp(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                if distill:
                    if cache is not None:
                        t_start, t_end = (x.to(device) for x in cache.batch(idx, batch["input_ids"].shape[1]))
                    else:
                        with torch.inference_mode(), autocast:
                            t_out = teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                        t_start, t_end = t_out.start_logits.clone(), t_out.end_logits.clone()
                    loss, kd, ce = distillation_loss(out.start_logits, out.end_logits, t_start, t_end,
                                                     batch["start_positions"], batch["end_positions"],
                                                     batch["attention_mask"], args.distillation_loss_weight,
                                                     args.temperature)
                else:
                    loss = ce = span_ce_loss(out.start_logits, out.end_logits, batch["start_positions"],
                                             batch["end_positions"], batch["attention_mask"])
                    kd = torch.zeros(())
                scaler.scale(loss * weight).backward()
            sums += torch.stack([loss.detach(), kd.detach(), ce.detach()]).float().cpu() * weight / world
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(sums)
        n_last += len(global_idx)

        # --- logging, checkpoints, evaluation
        if master:
            now = time.perf_counter()
            row = {"step": step + 1, "loss": round(sums[0].item(), 5), "kd_loss": round(sums[1].item(), 5),
                   "ce_loss": round(sums[2].item(), 5), "lr": lr, "examples_per_s": round(n_last / (now - t_last), 2)}
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            t_last, n_last = now, 0
            bar.set_postfix(loss=f"{row['loss']:.3f}", kd=f"{row['kd_loss']:.3f}", ce=f"{row['ce_loss']:.3f}",
                            lr=f"{lr:.2e}")
            bar.update(1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            checkpoint(os.path.join(args.out, f"checkpoint-{step + 1}"))
        if eval_examples and master and pos == steps_per_epoch - 1:
            evaluate_epoch(model, tokenizer, eval_examples, fcfg, device, epoch, log, log_file)
        if args.stop_after is not None and step + 1 == args.stop_after and step + 1 < total_steps:
            checkpoint(os.path.join(args.out, f"checkpoint-{step + 1}"))
            log(f"stopped after step {step + 1} (--stop-after); continue with --resume "
                f"{os.path.join(args.out, f'checkpoint-{step + 1}')}")
            break
    else:
        if master:
            save_final(args.out, model, tokenizer, args)
        log(f"saved {args.out}")
    bar.close()
    if log_file:
        log_file.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return model


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
        log_file.write(json.dumps({"epoch": epoch + 1, "eval": m}) + "\n")
