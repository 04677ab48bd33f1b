"""The training data at MRQA train's scale in bounded memory: featurization into the on-disk store, the
teacher-logit cache and training steps read from it, at 10%, 30% and 100% of the real train split's shape.

    python benchmarks/bench_store.py                       # all three sizes, each in its own process
    python benchmarks/bench_store.py --sizes 0.1           # one size

The data: per MRQA train dataset, its number of questions (tinyqa/mrqa.py's SPLITS, 516,819 in all) with
the questions per context and mean context length of the MRQA paper's Table 1 (Fisch et al. 2019; tokens):
SQuAD ~4.6 questions per 137-token context, NewsQA ~6.5 per 599, TriviaQA 1 per 784, SearchQA 1 per 749,
HotpotQA 1 per 232, NaturalQuestions 1 per 153: about 180M context tokens. Contexts are real SQuAD dev
paragraphs (../shared/data) strung together to a length drawn from a gamma distribution around that mean;
questions are real SQuAD questions, answers a span of the context. Tokenized with the real RoBERTa tokenizer.

Each size runs in a fresh process (its VmHWM is its own peak resident memory) and reports:
- featurization: the store build (read, validate, tokenize, cut windows, label, write) in tokens/s against
  the tokenizer alone (`encode_batch` over the same contexts and questions, already in memory), same process,
  timed once before the build and once after it (their mean: the machine's speed drifts within minutes);
- the store's size on disk, windows and tokens;
- the teacher-logit cache over every window with a tiny teacher (1 x 16), in windows/s;
- training steps/s of a tiny student (2 x 64) with batches read from the store against the same steps with
  the same windows held in memory as featurize's Feature objects (the way training read them before),
  paired step by step (two copies of the student, stepped in turn on the same batches), and the batch
  assembly alone;
- peak RSS (VmHWM) at the end, so after all of it, and the anonymous memory (RssAnon). The store's ids and
  the teacher's logits are read with pread (tinyqa/files.py's RowFile), so they sit in the page cache and
  not in RSS; with a memory map, an epoch's touched pages made RSS grow by the store's size.
Targets (issue 13): peak RSS at 100% under 3 GB and within 20% of 30%'s; featurization at least 0.8x the
raw tokenizer; training steps/s within 5% of in-memory.
"""
import argparse
import copy
import gzip
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import shared_data  # noqa: E402
from tinyqa.features import FeaturizerConfig, collate, featurize, length_sorted_batches  # noqa: E402
from tinyqa.losses import span_ce_loss  # noqa: E402
from tinyqa.model import EncoderConfig, EncoderForQA  # noqa: E402
from tinyqa.catalog import SPLITS  # noqa: E402
from tinyqa.mrqa import read_mrqa  # noqa: E402
from tinyqa.store import build, store_key  # noqa: E402
from tinyqa.teacher_cache import compute, finish, start  # noqa: E402
from tinyqa.tokenizer import load_tokenizer  # noqa: E402
from tinyqa.train import epoch_batches, param_groups  # noqa: E402

# (questions per context, mean context tokens): MRQA paper, Table 1 (train)
SHAPE = {"SQuAD": (4.6, 137), "NewsQA": (6.5, 599), "TriviaQA": (1.0, 784), "SearchQA": (1.0, 749),
         "HotpotQA": (1.0, 232), "NaturalQuestions": (1.0, 153)}
CHARS_PER_TOKEN = 4.85  # RoBERTa BPE on SQuAD dev's 2,067 contexts, measured: 4.85 characters a token


def shared():
    d = shared_data()
    if not os.path.isdir(d):
        sys.exit("error: needs ../shared/data (SQuAD dev paragraphs and the RoBERTa tokenizer); set TINYQA_SHARED")
    return d


def generate(folder, fraction, seed=0):
    """One .jsonl.gz per MRQA train dataset at `fraction` of its size; returns the paths."""
    paragraphs, questions = [], []
    with gzip.open(os.path.join(shared(), "mrqa", "SQuAD-dev-v1.1.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "context" in row:
                paragraphs.append(row["context"])
                questions += [qa["question"] for qa in row["qas"]]
    rng = random.Random(seed)
    paths = []
    for (split, name), (_, _, n_questions) in SPLITS.items():
        if split != "train":
            continue
        per_context, mean_tokens = SHAPE[name]
        n_questions = max(1, round(fraction * n_questions))
        path = os.path.join(folder, f"{name}.jsonl.gz")
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
            f.write(json.dumps({"header": {"dataset": name, "split": "train"}}) + "\n")
            done, c = 0, 0
            while done < n_questions:
                target = rng.gammavariate(4.0, mean_tokens / 4.0) * CHARS_PER_TOKEN  # chars, mean as Table 1
                parts, size = [], 0
                while size < target:
                    p = rng.choice(paragraphs)
                    parts.append(p)
                    size += len(p) + 1
                context = " ".join(parts)[: max(50, int(target))]
                k = min(n_questions - done, max(1, round(rng.expovariate(1 / per_context)) if per_context > 1 else 1))
                qas = []
                for j in range(k):
                    a = rng.randrange(0, max(1, len(context) - 30))
                    a = context.find(" ", a) + 1 or 0
                    b = context.find(" ", a + 3)
                    b = b if b > a else len(context)
                    qas.append({"qid": f"{name}-{c}-{j}", "question": rng.choice(questions), "answers": [context[a:b]],
                                "detected_answers": [{"text": context[a:b], "char_spans": [[a, b - 1]]}]})
                f.write(json.dumps({"context": context, "qas": qas}, ensure_ascii=False) + "\n")
                done, c = done + k, c + 1
        paths.append(path)
    return paths


def vm_hwm_gb():
    return _status_gb("VmHWM")


def rss_anon_gb():
    """The process's own memory now (heap, stacks): RSS less any mapped files (the libraries; the store's
    ids and the teacher's logits are read with pread, so they are in neither)."""
    return _status_gb("RssAnon")


def _status_gb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20


def raw_tokenizer_speed(paths, tok):
    """Tokens/s of encode_batch alone over every context and question of the files, 2,000 at a time as the
    store's build takes them; only encode_batch is timed. Read in chunks, not whole files: a whole file's
    text in memory would make this measurement, not the store, set the process's peak RSS."""
    tokens, seconds = 0, 0.0

    def timed(texts):
        nonlocal tokens, seconds
        t = time.perf_counter()
        enc = tok.encode_batch(texts, add_special_tokens=False)
        seconds += time.perf_counter() - t
        tokens += sum(len(e.ids) for e in enc)

    for path in paths:
        contexts, qs = [], []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if "context" in row:
                    contexts.append(row["context"])
                    qs += [qa["question"] for qa in row["qas"]]
                if len(contexts) == 2000:
                    timed(contexts)
                    contexts = []
                if len(qs) >= 2000:
                    timed(qs)
                    qs = []
        for rest in (contexts, qs):
            if rest:
                timed(rest)
    return tokens, seconds


def paired_steps(model, sources, batches):
    """Seconds of training steps per source, measured in pairs: one copy of `model` (and its own AdamW) per
    source, all fed the same batches, stepped in turn batch by batch, the order flipping every batch. Every
    copy does the same arithmetic, so only the source differs, and the machine's drift (on a shared 2-core
    VM, whole 100-step runs of the SAME batches differ by 5-8%) falls on all of them alike."""
    models = {name: copy.deepcopy(model) for name in sources}
    opts = {name: torch.optim.AdamW(param_groups(m, 0.01), lr=1e-4) for name, m in models.items()}
    seconds, order = {name: 0.0 for name in sources}, list(sources)
    for idx in batches:
        for name in order:
            t = time.perf_counter()
            b = sources[name](idx)
            out = models[name](b["input_ids"], b["attention_mask"], b["token_type_ids"])
            loss = span_ce_loss(out.start_logits, out.end_logits, b["start_positions"], b["end_positions"],
                                b["attention_mask"])
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            seconds[name] += time.perf_counter() - t
        order.reverse()
    return seconds


def worker(fraction, work, steps, rounds):
    """One size, in this process: generate, featurize, cache, train; print one JSON line of results."""
    out = {"fraction": fraction}
    data = os.path.join(work, "data")
    os.makedirs(data, exist_ok=True)
    t = time.perf_counter()
    paths = generate(data, fraction)
    out["generate_s"] = time.perf_counter() - t
    tok = load_tokenizer(os.path.join(shared(), "roberta-tokenizer"))
    fcfg = FeaturizerConfig()  # the card's 384 / 128 / 64
    out["raw_tokens"], out["raw_s"] = raw_tokenizer_speed(paths, tok)

    # --- featurization into the store
    root = os.path.join(work, "features")
    os.makedirs(root)
    key, info = store_key(root, paths, tok, fcfg, None, False)
    folder = os.path.join(root, key)
    t = time.perf_counter()
    build(paths, tok, fcfg, None, False, folder, info, log=lambda *a: None, progress=False)
    out["featurize_s"] = time.perf_counter() - t
    # raw again after the build: the ratio uses the mean of the two, which brackets the build in time (this
    # VM's tokenizer speed moved from 0.78 to 0.64M tokens/s across one 10% build)
    out["raw_s_after"] = raw_tokenizer_speed(paths, tok)[1]
    from tinyqa.features import pair_layout
    from tinyqa.store import FeatureStore
    store = FeatureStore(folder, pair_layout(tok))
    out.update(windows=len(store), window_tokens=int(store.offsets[-1]), examples=store.info["examples"],
               store_bytes=sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)))
    out["rss_after_featurize_gb"], out["anon_after_featurize_gb"] = vm_hwm_gb(), rss_anon_gb()

    # --- teacher cache with a tiny teacher over every window
    torch.manual_seed(0)
    small = dict(vocab_size=tok.get_vocab_size(), max_position_embeddings=514, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
    teacher = EncoderForQA(EncoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, **small)).eval()
    cache_folder = os.path.join(work, "teacher-cache", "c")
    os.makedirs(os.path.dirname(cache_folder))
    t = time.perf_counter()
    tmp = start(cache_folder, store.lengths)
    batches = length_sorted_batches(store.lengths, 64, 1536)
    compute(teacher, store, tmp, batches, "cpu", torch.autocast("cpu", enabled=False), progress=False)
    finish(tmp, cache_folder, store.lengths, {})
    out["teacher_cache_s"] = time.perf_counter() - t
    out["teacher_cache_bytes"] = os.path.getsize(os.path.join(cache_folder, "logits.npy"))
    out["rss_after_cache_gb"], out["anon_after_cache_gb"] = vm_hwm_gb(), rss_anon_gb()

    # --- training steps: batches from the store vs the same windows as in-memory Feature objects
    student = EncoderForQA(EncoderConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, **small)).train()
    steps_batches = epoch_batches(0, 0, store.lengths, 32)[:steps]
    needed = sorted({i for b in steps_batches for i in b})
    in_memory = {i: f for i, f in zip(needed, _features_of(paths, tok, fcfg, needed, store))}
    pad = tok.token_to_id("<pad>")
    from_store = lambda idx: store.batch(idx, pad)
    from_memory = lambda idx: collate([in_memory[i] for i in idx], with_labels=True, pad_id=pad)
    for idx in steps_batches:  # the same batches either way
        a, b = from_store(idx), from_memory(idx)
        assert all(torch.equal(a[k], b[k]) for k in b)
    # Batch assembly alone, then whole training steps, paired step by step (paired_steps).
    sources = {"store": from_store, "memory": from_memory}
    for name, source in sources.items():
        t = time.perf_counter()
        for idx in steps_batches:
            source(idx)
        out[f"{name}_batch_ms"] = 1000 * (time.perf_counter() - t) / len(steps_batches)
    best = {name: math.inf for name in sources}
    for _ in range(rounds):
        for name, s in paired_steps(student, sources, steps_batches).items():
            best[name] = min(best[name], s)
    out["steps"] = len(steps_batches)
    out["store_steps_per_s"] = len(steps_batches) / best["store"]
    out["memory_steps_per_s"] = len(steps_batches) / best["memory"]
    out["peak_rss_gb"], out["anon_at_end_gb"] = vm_hwm_gb(), rss_anon_gb()
    print("RESULT " + json.dumps(out), flush=True)


def _features_of(paths, tok, fcfg, needed, store):
    """featurize()'s Feature objects for the store's windows `needed`: the examples that own them read
    again and featurized, each window found at its place among its example's windows."""
    owner = store.windows[:, 0]  # example index of each window, ascending
    wanted = sorted({int(owner[i]) for i in needed})
    keep, examples = set(wanted), []
    with_span = (ex for path in paths for ex in read_mrqa(path) if ex.span is not None)
    for n, ex in enumerate(with_span):
        if n in keep:
            examples.append(ex)
        if n >= wanted[-1]:
            break
    by_example = {}
    for f in featurize(examples, tok, fcfg, with_labels=True, with_offsets=False):
        by_example.setdefault(wanted[f.example_index], []).append(f)
    return [by_example[int(owner[i])][i - int(np.searchsorted(owner, owner[i]))] for i in needed]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.3, 1.0], help="fractions of MRQA train's size")
    p.add_argument("--steps", type=int, default=300, help="training steps per timed run")
    p.add_argument("--rounds", type=int, default=2, help="rounds of paired store / in-memory training steps (best counts)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--worker", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.work, args.steps, args.rounds)
    results = []
    for size in args.sizes:
        work = tempfile.mkdtemp(prefix="tinyqa-bench-store-", dir=args.work)
        r = subprocess.run([sys.executable, __file__, "--worker", str(size), "--work", work, "--steps", str(args.steps),
                            "--rounds", str(args.rounds)], capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        shutil.rmtree(work, ignore_errors=True)
        if line is None:
            sys.exit(f"size {size} failed:\n{r.stderr[-3000:]}")
        results.append(json.loads(line[7:]))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'size':>6}{'questions':>11}{'windows':>10}{'peak RSS':>10}{'featurize':>12}{'raw':>12}{'ratio':>7}"
          f"{'store':>9}{'cache w/s':>11}{'steps/s store':>15}{'in memory':>11}{'ratio':>7}{'batch ms':>9}{'memory':>9}"
          f"{'anon GB':>9}{'at end':>9}")
    for r in results:
        feat = (r["raw_tokens"]) / r["featurize_s"]
        raw = r["raw_tokens"] / ((r["raw_s"] + r["raw_s_after"]) / 2)
        print(f"{100 * r['fraction']:>5.0f}%{r['examples']:>11,}{r['windows']:>10,}{r['peak_rss_gb']:>8.2f}GB"
              f"{feat / 1e6:>9.2f}M/s{raw / 1e6:>9.2f}M/s{feat / raw:>7.2f}{r['store_bytes'] / 2**30:>7.2f}GB"
              f"{r['windows'] / r['teacher_cache_s']:>11.0f}{r['store_steps_per_s']:>15.2f}{r['memory_steps_per_s']:>11.2f}"
              f"{r['store_steps_per_s'] / r['memory_steps_per_s']:>7.2f}{r['store_batch_ms']:>9.2f}{r['memory_batch_ms']:>9.2f}"
              f"{r['anon_after_featurize_gb']:>9.2f}{r['anon_at_end_gb']:>9.2f}")
    print("featurize and raw: tokens/s over the same contexts and questions (raw: encode_batch alone, text in memory, "
          "timed before and after the build, the mean of the two); "
          "store: its size on disk; cache w/s: teacher-cache windows/s (1 x 16 teacher); batch ms: assembling one "
          "32-window batch from the store / from in-memory features; anon GB: RssAnon after featurization / at the end")


if __name__ == "__main__":
    main()
