"""A training run's folder: checkpoints, --resume, log.jsonl, and stopping cleanly on Ctrl-C or SIGTERM.

Layout of --out:
    log.jsonl            one row per optimizer step, and one per epoch's evaluation
    checkpoint-STEP/     HF-layout model + args.json + training_state.pt (the newest --keep-checkpoints)
    config.json, model.safetensors, tokenizer files, args.json     the final model, once the run completes

What a user can rely on:
- a checkpoint folder is written under a temporary name and renamed, so a kill (or a full disk) leaves the
  earlier checkpoints whole; Ctrl-C or SIGTERM finishes the current step and saves one before exiting;
- training_state.pt holds only tensors, numbers, strings, lists and dicts (RNG states converted), so it
  loads with torch.load(weights_only=True): resuming never unpickles code;
- --resume continues in the checkpoint's own folder with the settings the run started with; a flag given
  with --resume that would change them is refused, never silently ignored; log.jsonl is cut back to the
  checkpoint's step, so no step appears twice;
- a fresh run never mixes into another: a non-empty --out is refused unless --overwrite;
- `--resume auto` (what torchrun's --max-restarts needs: a restarted group runs the same command line)
  continues from the newest complete checkpoint in --out, or starts the run when it has none; the first
  steps of an attempt lost before its first checkpoint (its log.jsonl, the args.json written with the log's
  first row) are replaced when their settings are this command line's, and refused, naming the difference,
  when they are another run's. TINYQA_TEST_KILL is a test hook that kills a rank at a given step
  (`kill_hook_for_tests`).
"""
import glob
import json
import os
import random
import re
import shutil
import signal
import sys
import threading

import numpy as np
import torch

from . import distributed
from .errors import TinyQAError
from .files import atomic_write, disk_error, fsync_tree, read_json
from .weights import save_pretrained

# Arguments of how a run is executed, not of what it computes: free to change on --resume.
RUNTIME_ARGS = {"resume", "out", "save_every", "stop_after", "device", "quiet", "teacher_cache", "feature_store",
                "eval_data", "overwrite", "keep_checkpoints", "teacher_batch_size", "given"}
# What a run writes into --out (and --overwrite removes): the final model's files, the log, checkpoints.
RUN_FILES = ("log.jsonl", "args.json", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# args.json keys that an earlier tinyqa wrote under another name, and the name they have now.
RENAMED = {"max_query_length": "max_question_len"}


def saved_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "given"}


def read_args(folder, what="the run's arguments") -> dict:
    """A checkpoint's args.json, with the keys earlier versions wrote renamed to today's."""
    saved = read_json(os.path.join(folder, "args.json"), what)
    return {RENAMED.get(k, k): v for k, v in saved.items()}


# --- the run folder

def checkpoints(out):
    """[(step, path)] of the complete checkpoints in out, oldest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(out), "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path))
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def check_fresh_out(out, overwrite):
    """A new run needs an empty (or new) --out: another run's log and checkpoints would mix with ours."""
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        held = "another run" if checkpoints(out) or os.path.exists(os.path.join(out, "log.jsonl")) else "files"
        raise TinyQAError(f"--out {out} already holds {held}: pass --overwrite to replace it, --resume "
                          f"{os.path.join(out, 'checkpoint-STEP')} to continue it, or choose another --out")


def clear_run(out):
    """--overwrite: remove what an earlier run wrote into out (only tinyqa's own files; others stay)."""
    if not os.path.isdir(out):
        return
    for _, path in checkpoints(out):
        shutil.rmtree(path)
    for path in glob.glob(os.path.join(glob.escape(out), "checkpoint-*.tmp")) + \
            glob.glob(os.path.join(glob.escape(out), "final.tmpdir")):
        shutil.rmtree(path, ignore_errors=True)
    for name in RUN_FILES:
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def prune_checkpoints(out, keep):
    """Keep the newest `keep` checkpoints (0 keeps all): a card-length run saving every 1,000 steps would
    otherwise leave tens of GB."""
    if keep:
        for _, path in checkpoints(out)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def restart_log(out, start_step, steps_per_epoch):
    """On --resume, log.jsonl keeps only what happened up to the checkpoint (written atomically), so the
    steps the killed run did after it are not logged twice."""
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if row.get("step", 0) <= start_step and row.get("epoch", 0) * steps_per_epoch <= start_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    with atomic_write(path) as f:
        f.writelines(keep)


class RunLog:
    """log.jsonl, one JSON object per line, flushed each row; opened at the first row, so a run that fails
    before its first step leaves no log behind (and no --out that later runs must --overwrite). A fresh
    run's settings (`settings`: its args.json) are written beside it first, so that `--resume auto` can tell
    this run's lost first steps from another run's."""

    def __init__(self, path, append, settings=None):
        self.path, self.mode, self.f, self.settings = path, "a" if append else "w", None, settings

    def write(self, row: dict):
        if self.f is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            if self.settings is not None and self.mode == "w":
                with atomic_write(os.path.join(os.path.dirname(self.path), "args.json")) as f:
                    json.dump(self.settings, f, indent=2)
            self.f = open(self.path, self.mode, encoding="utf-8")
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()


# --- checkpoints

def save_checkpoint(folder, model, tokenizer, args, state=None):
    """HF-layout model folder + args.json (+ training_state.pt for --resume). A checkpoint folder is
    written under a temporary name, synced to disk and renamed, so a kill or a full disk never leaves a
    half-written checkpoint: a write that fails (torch.save and safetensors report a full disk as their
    own errors, not as OSError) stops the run naming the newest complete checkpoint to resume from."""
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp, tokenizer=tokenizer)
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(saved_args(args), f, indent=2)
        if state is not None:
            torch.save(state, os.path.join(tmp, "training_state.pt"))
        fsync_tree(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        fsync_tree(os.path.dirname(os.path.abspath(folder)), files=False)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        done = checkpoints(os.path.dirname(os.path.abspath(folder)))
        resume = f"; continue with --resume {done[-1][1]}" if done else ""
        first_line = (str(e).strip().splitlines() or [""])[0][:120]
        cause = disk_error(folder, e) if isinstance(e, OSError) else \
            f"{folder}: cannot write ({type(e).__name__}: {first_line}); if the disk is full, free space"
        raise TinyQAError(f"{cause}{resume}") from e


def save_final(out, model, tokenizer, args):
    """The final model straight into --out, beside log.jsonl and the checkpoints, which stay."""
    tmp = os.path.join(out, "final.tmpdir")
    save_checkpoint(tmp, model, tokenizer, args)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.rmdir(tmp)


def rng_states():
    """The RNG states as plain lists and tensors (not numpy arrays or tuples of them), so that
    training_state.pt loads with weights_only=True."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"python": [version, list(mt), gauss],
         "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_states(s):
    version, mt, gauss = s["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


STATE_KEYS = ("optimizer", "scheduler", "scaler", "rng", "step", "n_features")


def load_training_state(folder):
    path = os.path.join(folder, "training_state.pt")
    try:  # weights_only: plain data only; a state file cannot run code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated (EOF / zip errors), not ours, or holding pickled objects
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise TinyQAError(f"{path}: cannot be read as a training state ({type(e).__name__}: {first}); the "
                          "checkpoint is damaged: resume from an earlier checkpoint-STEP")
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise TinyQAError(f"{path}: not a tinyqa training state (missing {[k for k in STATE_KEYS if k not in state]})")
    return state


# --- --resume

def _same(a, b):
    """Equal values, or the same files named by different paths."""
    if a == b:
        return True
    as_list = lambda x: x if isinstance(x, list) else [x]
    a, b = as_list(a), as_list(b)
    return len(a) == len(b) and all(isinstance(x, str) and isinstance(y, str) and os.path.exists(x)
                                    and os.path.realpath(x) == os.path.realpath(y) for x, y in zip(a, b))


def resume_args(args):
    """The run's own arguments from the checkpoint's args.json; --out becomes the checkpoint's run folder.
    `args.given` (the flags named on the command line, set by build_parser's parser) are checked against
    the checkpoint: one that would change the run is refused."""
    folder = args.resume
    if not os.path.isdir(folder):
        raise TinyQAError(f"--resume {folder}: no such directory")
    if not os.path.exists(os.path.join(folder, "training_state.pt")) or not os.path.exists(os.path.join(folder, "args.json")):
        raise TinyQAError(f"--resume {folder}: not a training checkpoint (no training_state.pt and args.json); a "
                          "finished run's final model cannot be resumed: start a new run from it instead")
    saved = read_args(folder)
    if saved.get("distill", args.distill) != args.distill:
        script = "train_distill.py" if saved["distill"] else "train_finetune.py"
        kind = "a distillation" if saved["distill"] else "a fine-tuning"
        raise TinyQAError(f"--resume {folder}: {kind} checkpoint; continue it with {script}")
    run_dir = os.path.dirname(os.path.abspath(folder))
    given = getattr(args, "given", None) or ()
    conflicts = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {saved[k]})" for k in given
                 if k in saved and k not in RUNTIME_ARGS and not _same(getattr(args, k), saved[k])]
    if "out" in given and os.path.realpath(args.out) != os.path.realpath(run_dir):
        conflicts.append(f"--out {args.out} (a resumed run continues in its own folder {run_dir})")
    if conflicts:
        raise TinyQAError(f"--resume keeps the settings the run started with; drop {', '.join(conflicts)}, or "
                          "start a new run")
    for k, v in saved.items():
        # Runtime flags (--save-every, --device, ...) keep the run's values unless given again now.
        if k not in RUNTIME_ARGS or (k not in given and k not in ("resume", "stop_after", "overwrite")):
            setattr(args, k, v)
    args.out = run_dir
    return args


def is_complete_checkpoint(folder) -> bool:
    return all(os.path.isfile(os.path.join(folder, name))
               for name in ("training_state.pt", "args.json", "config.json", "model.safetensors"))


def auto_resume(args):
    """--resume auto: args resuming from the newest complete checkpoint in --out, else args of a fresh start
    (args.resume None). A fresh start over what an attempt of this same run left before its first checkpoint
    (args.json, log.jsonl, temporary folders) removes it as --overwrite would; settings that differ from that
    attempt's, or a finished run in --out, are refused."""
    if args.overwrite:
        raise TinyQAError("--resume auto continues the run in --out after a restart, and --overwrite would delete "
                          "it: drop one of them")
    done = [path for _, path in checkpoints(args.out) if is_complete_checkpoint(path)]
    args.resume = done[-1] if done else None
    if done or not os.path.isdir(args.out) or not os.listdir(args.out):
        return args
    if os.path.exists(os.path.join(args.out, "model.safetensors")):
        raise TinyQAError(f"--resume auto: --out {args.out} holds a finished run and no checkpoint to continue: "
                          "nothing to do; choose another --out, or pass --overwrite instead to train it again")
    attempt = os.path.join(args.out, "args.json")
    if os.path.exists(attempt):
        saved = read_args(args.out, "the settings of the run's first attempt")
        ignored = RUNTIME_ARGS | {"init"}  # init: what build_model found, set during the run
        differ = [f"--{k.replace('_', '-')} {getattr(args, k)} (that run has {saved[k]})" for k in saved
                  if k not in ignored and hasattr(args, k) and not _same(getattr(args, k), saved[k])]
        if differ:
            raise TinyQAError(f"--resume auto: --out {args.out} holds the first steps of another run, without a "
                              f"checkpoint: {', '.join(differ)}; choose another --out, or --overwrite it")
        args.overwrite = True  # the lost attempt's log and settings: this run starts over them
    return args  # anything else in --out is left to check_fresh_out, which refuses it


def check_same_start(dist, args):
    """Every process of a group starts from the same checkpoint: --resume auto looks into --out on each node,
    and nodes that do not share one folder would otherwise continue from different steps."""
    if dist.world == 1:
        return
    found = distributed.gather(dist, os.path.basename(args.resume) if args.resume else "a fresh start")
    if len(set(found)) > 1:
        points = ", ".join(f"rank {r}: {x}" for r, x in enumerate(found))
        raise TinyQAError(f"the processes would start from different points ({points}): --out {args.out} must be "
                          "one folder that every node sees")


# A test hook, read here and nowhere else: TINYQA_TEST_KILL="STEP:RANK:ATTEMPT[,...]" makes process RANK kill
# itself with SIGKILL right after optimizer step STEP (and that step's checkpoint, if it has one) on
# torchrun's attempt ATTEMPT (0 is the first; TORCHELASTIC_RESTART_COUNT), as a lost machine would.
# tests/test_distributed.py restarts groups with it; nothing else sets it.
KILL_HOOK = "TINYQA_TEST_KILL"


def kill_hook_for_tests(step, rank):
    if f"{step}:{rank}:{distributed.restart_count()}" in os.environ.get(KILL_HOOK, "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)


# --- stopping cleanly

class StopSignal:
    """Ctrl-C (SIGINT) or SIGTERM during the loop: the current step finishes, a checkpoint is saved and the
    run exits, so at most the step in flight is lost. A second signal stops at once."""

    def __init__(self):
        self.received, self._old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: finishing this step, then saving a checkpoint (again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
