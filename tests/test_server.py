"""`python -m tinyqa serve` over real HTTP on 127.0.0.1, and its page in a real headless browser.

Hermetic: a tokenizer trained here on generated text and a small random model (no ../shared needed).
The oracle for every answer is the Python API called directly on the same inputs. Every network call
has a timeout, so a hung server fails the test instead of stalling the suite.
"""
import http.client
import json
import shutil
import subprocess
import sys
import threading
import urllib.parse

import pytest
from conftest import ROOT
from hermetic import tiny_checkpoint

from tinyqa import QuestionAnswerer
from tinyqa.server import make_server

TIMEOUT = 60


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-ckpt")
    return d, tiny_checkpoint(d)


@pytest.fixture(scope="module")
def qa(checkpoint):
    return QuestionAnswerer.from_pretrained(str(checkpoint[0]))


@pytest.fixture(scope="module")
def server(qa):
    srv = make_server(qa, "127.0.0.1", 0, max_body_bytes=20_000, model_name="random-test-model", quiet=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def request(port, method, path, body=None, headers=None):
    """(status, parsed JSON or text) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read().decode()
        return r.status, (json.loads(data) if r.getheader("Content-Type", "").startswith("application/json") else data)
    finally:
        conn.close()


def post(port, obj):
    return request(port, "POST", "/answer", json.dumps(obj).encode(), {"Content-Type": "application/json"})


def as_dicts(answers):
    return [a.__dict__ for a in (answers if isinstance(answers, list) else [answers])]


def test_health_page_and_answers(server, qa, checkpoint):
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"]["name"] == "random-test-model"
    assert health["model"]["type"] == "roberta" and health["calibrated"] is False
    status, page = request(server, "GET", "/")
    assert status == 200 and "<mark" not in page and "random-test-model" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # nothing external
    row = checkpoint[1][0]
    q, c = row["qas"][0]["question"], row["context"]
    status, body = post(server, {"question": q, "context": c, "top_k": 3})
    assert status == 200 and body["answers"] == [as_dicts(qa.answer(q, c, top_k=3))]
    # many questions over one context, with per-call options, in the API's shapes
    qs = [x["question"] for x in row["qas"]]
    opts = {"max_seq_len": 48, "doc_stride": 8, "max_answer_len": 5, "handle_impossible_answer": True}
    status, body = post(server, {"question": qs, "context": c, **opts})
    assert status == 200 and body["answers"] == [as_dicts(a) for a in qa.answer_batch(qs, c, **opts)]
    status, body = post(server, {"inputs": [{"question": q, "context": c}, {"question": qs[-1], "context": c}]})
    assert status == 200 and body["answers"] == [as_dicts(qa.answer(q, c)), as_dicts(qa.answer(qs[-1], c))]


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "not UTF-8"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"context": "text"}', 400, "missing field 'question'"),
    (b'{"question": "Who?"}', 400, "missing field 'context'"),
    (b'{"question": "", "context": "text"}', 400, "the question is empty"),
    (b'{"question": "Who?", "context": "  \\n "}', 400, "the context is empty (only whitespace)"),
    (b'{"question": ["Who?", " "], "context": "text"}', 400, "input 1: the question is empty"),
    (b'{"question": ["a", "b"], "context": ["c"]}', 400, "2 questions but 1 contexts"),
    (b'{"question": 3, "context": "text"}', 400, "question must be a string"),
    (b'{"inputs": [{"question": "Who?"}]}', 400, "input 0: missing field 'context'"),
    (b'{"question": "Who?", "context": "text", "top_k": 0}', 400, "top_k must be a whole number >= 1"),
    (b'{"question": "Who?", "context": "text", "top_k": "3"}', 400, "top_k must be a whole number >= 1"),
    (b'{"question": "Who?", "context": "text", "doc_stride": 100, "max_seq_len": 64}', 400, "doc_stride"),
    (b'{"question": "Who?", "context": "text", "max_seq_len": 100000}', 400, "positions"),
    (b'{"question": "Who?", "context": "text", "topk": 3}', 400, "unknown field 'topk'"),
])
def test_bad_requests_get_a_json_error(server, body, status, message):
    got, err = request(server, "POST", "/answer", body)
    assert got == status and message in err["error"], err
    assert request(server, "GET", "/health")[0] == 200  # and the server goes on serving


def test_oversize_body_is_refused_and_other_errors(server):
    big = json.dumps({"question": "Who?", "context": "word " * 10_000}).encode()  # 50 kB > the 20 kB limit
    status, err = request(server, "POST", "/answer", big)
    assert status == 413 and "--max-body-bytes" in err["error"]
    # a raw connection without Content-Length: 411, and a wrong path or method: 404 / 405
    status, err = request(server, "POST", "/answer", None, {"Transfer-Encoding": "chunked"})
    assert status == 411 and "Content-Length" in err["error"]
    assert request(server, "GET", "/nope")[0] == 404
    assert request(server, "GET", "/answer")[0] == 405


def test_eight_concurrent_clients_get_their_own_answers(server, qa, checkpoint):
    """8 threads, each posting its own questions (different contexts, top_k and windows) 4 times, started
    together: every response must equal what the API gives for that client's own request."""
    rows = checkpoint[1]
    jobs = []
    for i in range(8):
        row = rows[1 + i]
        req = {"question": [x["question"] for x in row["qas"]], "context": row["context"], "top_k": 1 + i % 3,
               "max_seq_len": 40 + 8 * (i % 2), "doc_stride": 8}
        jobs.append((req, [as_dicts(a) for a in qa.answer_batch(req["question"], req["context"],
                                                                  **{k: req[k] for k in ("top_k", "max_seq_len",
                                                                                         "doc_stride")})]))
    assert len({json.dumps(want) for _, want in jobs}) == 8  # the clients' answers all differ
    barrier, failures = threading.Barrier(8), []

    def client(req, want):
        try:
            barrier.wait(timeout=TIMEOUT)
            for _ in range(4):
                status, body = post(server, req)
                if status != 200 or body["answers"] != want:
                    failures.append((req["question"][0], status, body))
        except Exception as e:  # noqa: BLE001  a failure to report, not to hide in a thread
            failures.append(repr(e))

    threads = [threading.Thread(target=client, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not failures, failures[:2]


def test_serve_command_listens_on_loopback_and_prints_its_port(checkpoint):
    p = subprocess.Popen([sys.executable, "-m", "tinyqa", "serve", "--model", str(checkpoint[0]), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = p.stdout.readline()  # "serving ... on http://127.0.0.1:PORT/"
        assert "http://127.0.0.1:" in line, line + p.stderr.read()
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        assert request(port, "GET", "/health")[0] == 200
    finally:
        p.terminate()
        p.wait(timeout=TIMEOUT)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_page_in_headless_chromium_highlights_the_answer(server, qa, tmp_path):
    """The page, opened with ?context=...&question=..., asks at once; chromium's --dump-dom prints the DOM
    after the answer has come back (virtual time waits for the fetch). The <mark> must hold exactly the
    API's answer, found in a context with characters outside the BMP (JavaScript counts those as two)."""
    context = "The party 🎉🎉 was hosted by José 😀 Núñez in Zürich, and Ada Lovelace came at nine."
    question = "Who hosted the party?"
    best = qa.answer(question, context)
    assert best.text
    url = f"http://127.0.0.1:{server}/?" + urllib.parse.urlencode({"context": context, "question": question})
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom", url],
                       capture_output=True, text=True, timeout=120)
    dom = r.stdout
    assert "<mark>" in dom, (r.returncode, dom[-2000:], r.stderr[-2000:])
    import html
    mark = html.unescape(dom.split("<mark>", 1)[1].split("</mark>", 1)[0])
    assert mark == best.text
    view = dom.split('id="context-view">', 1)[1].split("</div>", 1)[0]
    assert html.unescape(view.replace("<mark>", "").replace("</mark>", "")) == context
    assert html.unescape(view.split("<mark>", 1)[0]) == context[:best.start]
    assert f'<span id="score">{best.score:.4f}</span>' in dom
