"""`python -m tinyqa serve` under load, measured side by side in one run against the same server:

1. one at a time: SQuAD dev questions sent one request after another (one question each);
2. concurrent: the same questions from --clients threads at once: throughput against (1), p50 and p99
   latency, and every answer equal to (1)'s;
3. a short request during a long one: the latency of a one-question request alone (median of a few), then
   while a --big-question request is being answered, and their ratio.

    python benchmarks/bench_serve.py                    # random tinyroberta weights, the RoBERTa tokenizer
    python benchmarks/bench_serve.py --model DIR --n 400 --clients 16 --big 1000

The server runs as its own process (the command users run), the clients in this one; nothing is
downloaded (the model is random unless --model is given). Prints the CPU, the settings and the ratios.
"""
import argparse
import gzip
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import ROOT, cpu_name, shared_data  # noqa: E402

TIMEOUT = 3600


def squad_pairs(path, n):
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "header" not in row:
                pairs += [(qa["question"], row["context"]) for qa in row["qas"]]
            if len(pairs) >= n:
                return pairs[:n]
    return pairs


def random_checkpoint(folder, config, tokenizer):
    import torch

    from tinyqa import EncoderConfig, EncoderForQA, load_tokenizer, save_pretrained
    torch.manual_seed(0)
    save_pretrained(EncoderForQA(EncoderConfig.from_json(config)), folder, tokenizer=load_tokenizer(tokenizer))
    return folder


def post(port, pairs):
    """(seconds, answers) of one POST /answer with these (question, context) pairs, on a fresh connection."""
    body = json.dumps({"inputs": [{"question": q, "context": c} for q, c in pairs]}).encode()
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/answer", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data[:200]}")
    return time.perf_counter() - t, json.loads(data)["answers"]


def start_server(model, args):
    cmd = [sys.executable, "-m", "tinyqa", "serve", "--model", model, "--port", "0"]
    if args.batch_tokens:
        cmd += ["--batch-tokens", str(args.batch_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    line = proc.stdout.readline()
    return proc, int(line.rsplit(":", 1)[1].split("/")[0])


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def sequential_and_concurrent(port, pairs, clients):
    """(1) and (2): seconds, latencies and answers of each."""
    t = time.perf_counter()
    seq = [post(port, [p]) for p in pairs]
    seq_s = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        con = list(pool.map(lambda p: post(port, [p]), pairs))
    con_s = time.perf_counter() - t
    return seq_s, seq, con_s, con


def short_during_long(port, pairs, big, repeats):
    """(3): latencies of a one-question request alone, then while a `big`-question request runs."""
    alone = [post(port, [pairs[k % len(pairs)]])[0] for k in range(repeats)]
    long_pairs = [pairs[k % len(pairs)] for k in range(big)]
    done, during = threading.Event(), []
    long = threading.Thread(target=lambda: (post(port, long_pairs), done.set()))
    long.start()
    time.sleep(1.0)  # the long request is being answered
    k = 0
    while not done.is_set() and len(during) < repeats:
        during.append(post(port, [pairs[k % len(pairs)]])[0])
        k += 1
        time.sleep(0.5)
    long.join()
    return alone, during


def main():
    d = shared_data()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: random weights of --config and --tokenizer)")
    p.add_argument("--config", default=os.path.join(d, "configs", "tinyroberta.json"), help="HF config.json")
    p.add_argument("--tokenizer", default=os.path.join(d, "roberta-tokenizer"), help="tokenizer folder")
    p.add_argument("--data", default=os.path.join(d, "mrqa", "SQuAD-dev-v1.1.jsonl.gz"), help="MRQA file")
    p.add_argument("--n", type=int, default=200, help="questions of (1) and (2)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients of (2)")
    p.add_argument("--big", type=int, default=1000, help="questions of the long request of (3)")
    p.add_argument("--repeats", type=int, default=7, help="short requests timed alone, and during the long one")
    p.add_argument("--batch-tokens", type=int, default=None, help="the server's --batch-tokens (default: its own)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    pairs = squad_pairs(args.data, max(args.n, args.repeats))
    with tempfile.TemporaryDirectory() as work:
        model = args.model or random_checkpoint(os.path.join(work, "model"), args.config, args.tokenizer)
        proc, port = start_server(model, args)
        try:
            post(port, pairs[:2])  # warm up
            seq_s, seq, con_s, con = sequential_and_concurrent(port, pairs[:args.n], args.clients)
            alone, during = short_during_long(port, pairs, args.big, args.repeats)
        finally:
            proc.terminate()
            proc.wait()
    same = sum(a[1] == b[1] for a, b in zip(seq, con))
    out = {"cpu": cpu_name(), "questions": args.n, "clients": args.clients, "big": args.big,
           "one_at_a_time_qps": args.n / seq_s, "concurrent_qps": args.n / con_s, "throughput_ratio": seq_s / con_s,
           "p50_s": {"one_at_a_time": percentile([s for s, _ in seq], 0.5), "concurrent": percentile([s for s, _ in con], 0.5)},
           "p99_s": {"one_at_a_time": percentile([s for s, _ in seq], 0.99), "concurrent": percentile([s for s, _ in con], 0.99)},
           "short_alone_s": statistics.median(alone), "short_during_long_s": statistics.median(during),
           "short_ratio": statistics.median(during) / statistics.median(alone), "same_answers": same / args.n}
    print(f"CPU: {out['cpu']}; {args.n} SQuAD dev questions, {args.clients} clients, long request {args.big}")
    print(f"one at a time  {out['one_at_a_time_qps']:7.2f} q/s  p50 {out['p50_s']['one_at_a_time']:.3f} s  "
          f"p99 {out['p99_s']['one_at_a_time']:.3f} s")
    print(f"concurrent     {out['concurrent_qps']:7.2f} q/s  p50 {out['p50_s']['concurrent']:.3f} s  "
          f"p99 {out['p99_s']['concurrent']:.3f} s   throughput {out['throughput_ratio']:.2f}x; same answers "
          f"{100 * out['same_answers']:.1f}%")
    print(f"a one-question request: {out['short_alone_s']:.3f} s alone, {out['short_during_long_s']:.3f} s during "
          f"the {args.big}-question one ({out['short_ratio']:.2f}x, median of {len(during)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
