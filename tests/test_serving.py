"""Serving under load: many concurrent clients batched through one model thread (tinyqa/batcher.py), each
answer equal to the one the API computes alone; the Host allow-list, CORS, /read, /metrics, /health; and a
SIGTERM that finishes what was accepted. The oracle is the Python API on the same inputs."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT
from hermetic import tiny_checkpoint

from tinyqa import QuestionAnswerer
from tinyqa.batcher import Batcher
from tinyqa.features import Feature
from tinyqa.server import make_server

TIMEOUT = 120


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("serving-ckpt")
    return d, tiny_checkpoint(d)


@pytest.fixture(scope="module")
def qa(checkpoint):
    return QuestionAnswerer.from_pretrained(str(checkpoint[0]))


def start(qa, **kw):
    srv = make_server(qa, "127.0.0.1", 0, model_name="tiny", quiet=True, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def as_dict(a):
    return {"text": a.text, "score": a.score, "start": a.start, "end": a.end, "logit_score": a.logit_score,
            "confidence": a.confidence}


def close(got, want, tol=1e-4):
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(close(got[k], want[k], tol) for k in want)
    if isinstance(want, list):
        return len(got) == len(want) and all(close(g, w, tol) for g, w in zip(got, want))
    if isinstance(want, float):
        return abs(got - want) <= tol * max(1.0, abs(want))
    return got == want


def test_a_hundred_concurrent_clients_are_all_answered_as_alone(qa, checkpoint):
    """100 clients at once, each with its own question (some with several): none reset or refused, every
    answer the one the API gives for that question alone."""
    rows = checkpoint[1]
    pairs = [(q["question"], r["context"]) for r in rows for q in r["qas"]]
    requests = [[pairs[i % len(pairs)]] if i % 4 else [pairs[j % len(pairs)] for j in range(i, i + 5)]
                for i in range(100)]
    want = [[[as_dict(a) for a in qa.answer(q, c, top_k=2)] for q, c in req] for req in requests]
    srv = start(qa)
    port = srv.server_address[1]

    def ask(req):
        body = json.dumps({"inputs": [{"question": q, "context": c} for q, c in req], "top_k": 2}).encode()
        return request(port, "POST", "/answer", body, {"Content-Type": "application/json"})

    try:
        with ThreadPoolExecutor(100) as pool:
            results = list(pool.map(ask, requests))
    finally:
        srv.shutdown()
        srv.server_close()
    assert [status for status, _, _ in results] == [200] * 100
    for (_, _, body), w in zip(results, want):
        assert close(json.loads(body)["answers"], w)


def feature(n):
    return Feature(input_ids=[0] * n, offsets=None, example_index=0)


def test_newcomers_go_first_and_cannot_starve_the_rest():
    """A request not yet served runs in the next pass with the other newcomers only; every pass holds at
    most 250 tokens a request (1000 in all) here; requests under way share passes least-served first;
    after FRESH_PASSES passes of newcomers, the others get one."""
    from tinyqa.batcher import _Job
    b = Batcher.__new__(Batcher)  # its queue alone, no model thread
    b.max_tokens, b.request_tokens, b.fresh_passes = 1000, 250, 0
    big, small = _Job([feature(100)] * 40), _Job([feature(100)] * 3)
    big.served = 2000  # the large request has had passes already
    b.jobs = [big, small]
    assert b._pick() == [(small, 0), (small, 1)]  # the newcomer alone: two windows
    assert b._pick() == [(small, 2), (big, 0), (big, 1), (big, 2), (big, 3)]  # both under way: 500 tokens
    newcomers = [_Job([feature(100)]) for _ in range(b.FRESH_PASSES + 1)]
    passes = []
    for job in newcomers:  # one arrives before every pass
        b.jobs.append(job)
        passes.append({j for j, _ in b._pick()})
    assert all(big not in p for p in passes[:b.FRESH_PASSES]) and big in passes[b.FRESH_PASSES]
    many = [_Job([feature(100)]) for _ in range(12)]
    b.jobs, b.fresh_passes = many, 0
    assert len(b._pick()) == 10  # twelve newcomers: the whole budget, 1000 tokens


def test_hosts_not_allowed_are_refused(qa):
    srv = start(qa, allow_hosts=["qa.example.org"])
    port = srv.server_address[1]
    try:
        for host, status in (("127.0.0.1:1", 200), ("localhost", 200), ("[::1]:80", 200), ("QA.example.org", 200),
                             ("evil.example.com", 403), ("127.0.0.1.evil.com", 403)):
            got, _, body = request(port, "GET", "/health", headers={"Host": host})
            assert got == status, (host, body)
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:  # no Host at all
            s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert s.recv(100).split()[1] == b"400"
    finally:
        srv.shutdown()
        srv.server_close()


def test_cors_only_when_asked(qa):
    for cors in (None, "https://app.example.org"):
        srv = start(qa, cors=cors)
        port = srv.server_address[1]
        try:
            _, headers, _ = request(port, "GET", "/health")
            assert headers.get("Access-Control-Allow-Origin") == cors
            status, headers, _ = request(port, "OPTIONS", "/answer", headers={"Origin": "https://app.example.org"})
            assert status == (204 if cors else 405)
        finally:
            srv.shutdown()
            srv.server_close()


def test_read_health_and_metrics(qa, checkpoint):
    rows = checkpoint[1]
    docs = [{"id": f"d{i}", "text": r["context"]} for i, r in enumerate(rows[:4])]
    question = rows[1]["qas"][0]["question"]
    srv = start(qa)
    port = srv.server_address[1]
    try:
        status, _, body = request(port, "POST", "/read", json.dumps({"question": question, "documents": docs,
                                                                     "top_k": 3}).encode())
        assert status == 200
        want = [a.__dict__ for a in qa.read(question, docs, top_k=3)]
        assert close(json.loads(body)["answers"], want)
        status, _, body = request(port, "GET", "/health")
        health = json.loads(body)
        assert status == 200 and str(checkpoint[0]) not in body.decode() and "/" not in health["model"]["name"]
        status, headers, body = request(port, "GET", "/metrics")
        text = body.decode()
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert 'tinyqa_requests_total{code="200",path="/read"} 1' in text and "tinyqa_questions_total 1" in text
        assert "tinyqa_batch_windows_count" in text and "tinyqa_queue_windows 0" in text
    finally:
        srv.shutdown()
        srv.server_close()


def test_sigterm_finishes_the_accepted_requests_then_refuses(checkpoint):
    """`python -m tinyqa serve`, SIGTERM while 8 requests are in flight: all 8 are answered, the server
    exits 0 and no longer accepts connections."""
    rows = checkpoint[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "tinyqa", "serve", "--model", str(checkpoint[0]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        inputs = [{"question": q["question"], "context": r["context"]} for r in rows for q in r["qas"]]
        body = json.dumps({"inputs": inputs * 3}).encode()
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(request, port, "POST", "/answer", body) for _ in range(8)]
            time.sleep(0.5)  # the requests are accepted and being answered
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        assert [status for status, _, _ in results] == [200] * 8
        assert all(len(json.loads(b)["answers"]) == len(inputs) * 3 for _, _, b in results)
        assert proc.wait(timeout=TIMEOUT) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
    finally:
        proc.kill()
        proc.wait()
