"""`python -m tinyqa serve`: the answer API as JSON over HTTP, and one page to try it. Standard library only.

    POST /answer   {"question": "Who wrote Hamlet?", "context": "Hamlet is ...", "top_k": 3}
                -> {"answers": [[{"text", "score", "start", "end", "logit_score", "confidence"}, ...]]}
    POST /read     {"question": "Who wrote Hamlet?", "documents": ["...", {"id": "b", "text": "..."}], "top_k": 3}
                -> {"answers": [{"text", "score", "document", "start", "end", "logit_score"}, ...]}
    GET  /health   {"status": "ok", "model": {...}, "calibrated": ...}   (no local paths)
    GET  /metrics  counters and histograms in Prometheus' text format
    GET  /         the page: paste a context, ask, see the answer highlighted with its score

/answer takes one question or many, in the API's shapes: "question" and "context" each a string or a list
(a list of questions with one context shares it), or "inputs": [{"question", "context"}, ...]; the options
are the API's. "answers" holds one list per question, in request order, best first; start and end are
offsets in code points (Python's str indices). /read is QuestionAnswerer.read: one ranking across documents.

Requests run in threads of their own; the model runs in one more (tinyqa/batcher.py), which takes the
windows of concurrent requests together, a budget of tokens per forward pass, least-served request first:
answers never mix, and a large request cannot starve a small one.

What it refuses: a Host header other than the localhost names, the --host address and --allow-host ones
(a web page cannot reach it by DNS rebinding), and without --cors every cross-origin browser call; every
client error is a JSON {"error"} with its status: 400 (bad JSON, a field of the wrong type, a bad option,
text that is not valid Unicode), 403 (a Host not allowed), 404, 405, 411 (no Content-Length), 413 (a body
over --max-body-bytes, never read into memory). SIGTERM or Ctrl-C stop accepting connections, finish the
requests in flight, then exit.

Why the standard library and not an ASGI server (uvicorn, starlette): the model, not the HTTP layer, is
what a request waits for; threads that block on the batcher are as good as coroutines here, and serving
takes no dependency beyond tinyqa's own.
"""
import copy
import html
import json
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .batcher import Batcher
from .errors import TinyQAError
from .files import JSON_ERRORS, json_problem, strict_json
from .prometheus import Metrics

OPTIONS = ("top_k", "max_answer_len", "max_seq_len", "doc_stride", "max_question_len", "handle_impossible_answer",
           "align_to_words")
READ_OPTIONS = ("top_k", "max_answer_len", "max_seq_len", "doc_stride", "max_question_len", "align_to_words",
                "no_answer")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
ROUTES = {"/": "GET", "/health": "GET", "/metrics": "GET", "/answer": "POST", "/read": "POST"}


def json_body(body: bytes, fields):
    """The request body as a JSON object with only `fields`; raises TinyQAError saying what is wrong."""
    try:
        req = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TinyQAError(f"the body is not UTF-8 (byte {e.start})")
    except JSON_ERRORS as e:
        raise TinyQAError(f"the body is {json_problem(e)}")
    if not isinstance(req, dict):
        raise TinyQAError('the body must be a JSON object: {"question": ..., ...}')
    unknown = sorted(set(req) - set(fields))
    if unknown:
        raise TinyQAError(f"unknown field '{unknown[0]}' (fields: {', '.join(fields)})")
    return req


def parse_request(body: bytes):
    """(pairs, options) of a POST /answer body; raises TinyQAError saying what is wrong."""
    from .answerer import pairs_of
    req = json_body(body, ("question", "context", "inputs", *OPTIONS))
    options = {k: req[k] for k in OPTIONS if k in req and req[k] is not None}
    if "inputs" in req:
        if "question" in req or "context" in req:
            raise TinyQAError("give inputs, or question and context, not both")
        if not isinstance(req["inputs"], list):
            raise TinyQAError('inputs must be a list of {"question": ..., "context": ...} objects')
        pairs = list(pairs_of(req["inputs"]))
    else:
        for key in ("question", "context"):
            if key not in req:
                raise TinyQAError(f"missing field '{key}'")
        q, c = req["question"], req["context"]
        if isinstance(q, str):
            q = [q]
            if not isinstance(c, str):
                raise TinyQAError("one question takes one context (a string)")
        if not isinstance(q, list) or not isinstance(c, (str, list)):
            raise TinyQAError("question must be a string or a list of strings, context a string or a list")
        pairs = list(pairs_of(q, c))
    if not pairs:
        raise TinyQAError("no questions in the request")
    return pairs, options


def parse_read(body: bytes):
    """(question, documents, options) of a POST /read body (QuestionAnswerer.read checks their values)."""
    req = json_body(body, ("question", "documents", *READ_OPTIONS))
    for key in ("question", "documents"):
        if key not in req:
            raise TinyQAError(f"missing field '{key}'")
    if not isinstance(req["documents"], list):
        raise TinyQAError('documents must be a list of strings or {"text": ..., "id": ...} objects')
    return req["question"], req["documents"], {k: req[k] for k in READ_OPTIONS if k in req and req[k] is not None}


def host_name(header):
    """The name in a Host header, without its port: "127.0.0.1:8000" -> 127.0.0.1, "[::1]:80" -> ::1."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Handler(BaseHTTPRequestHandler):
    server_version = "tinyqa"
    timeout = 60  # seconds a client may take to send its request: a stalled one cannot hold a thread forever

    def do_GET(self):
        path = self.route()
        if path is None:
            return
        if path == "/":
            self.send(200, PAGE.replace("{{MODEL}}", html.escape(self.server.model_label)).encode(),
                      "text/html; charset=utf-8")
        elif path == "/health":
            self.send_json(200, {"status": "draining" if self.server.draining else "ok",
                                 "model": self.server.model_info, "calibrated": self.server.calibrated})
        elif path == "/metrics":
            self.send(200, self.server.render_metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")

    def do_POST(self):
        path = self.route()
        if path is None:
            return
        body = self.read_body()
        if body is None:
            return
        t = time.perf_counter()
        try:
            result = self.server.answer(path, body)
        except TinyQAError as e:
            return self.send_json(400, {"error": str(e)})
        except Exception as e:  # a bug, not the client's fault: say so, and keep serving
            traceback.print_exc()
            return self.send_json(500, {"error": f"internal error ({type(e).__name__}): see the server's log"})
        self.server.metrics.observe("tinyqa_request_seconds", time.perf_counter() - t)
        self.send_json(200, result)

    def do_OPTIONS(self):
        """A browser's preflight before a cross-origin POST: allowed only with --cors."""
        path = self.route(method="OPTIONS")
        if path is not None:
            self.send(204, b"", "application/json", {"Access-Control-Allow-Methods": ROUTES[path],
                                                    "Access-Control-Allow-Headers": "Content-Type"})

    def do_other(self):
        self.route(method=self.command)

    do_PUT = do_DELETE = do_PATCH = do_TRACE = do_CONNECT = do_HEAD = do_other

    def route(self, method=None):
        """The path, when this request may be answered here; else answers it with its JSON error and
        gives None: a Host not allowed (403), a path not served (404), a method it does not take (405)."""
        method, path = method or self.command, self.path.split("?", 1)[0]
        host = self.headers.get("Host")
        if host is None or host_name(host) not in self.server.allowed_hosts:
            self.send_json(403 if host else 400, {"error": f"Host {host!r} is not served here (start the server "
                                                           "with --allow-host NAME to answer it)" if host else
                                                  "a Host header is required"})
            return None
        if path not in ROUTES:
            self.send_json(404, {"error": f"no such page {path}: try /, /health, /metrics, POST /answer or POST /read"})
            return None
        if method == "OPTIONS" and self.server.cors is not None:
            return path
        if method != ROUTES[path]:
            self.send_json(405, {"error": f"{method} is not served here: {ROUTES[path]} {path}"}, {"Allow": ROUTES[path]})
            return None
        return path

    def read_body(self):
        """The body of a POST, or None once a 411/413/400 has answered it (a body too large is not read
        into memory, but drained so that closing the socket does not reset the connection before the
        client reads the error)."""
        length = self.headers.get("Content-Length")
        digits = length.strip(" \t") if length is not None else None  # HTTP's whitespace only: str.strip takes more
        if digits is None or not re.fullmatch(r"[0-9]{1,15}", digits):
            self.close_connection = True
            self.send_json(411 if length is None else 400,
                           {"error": "a Content-Length header (a whole number of bytes) is required"})
            return None
        length, limit = int(digits), self.server.max_body_bytes
        if length > limit:
            self.close_connection = True
            left = min(length, 16 << 20)
            while left > 0:
                got = len(self.rfile.read(min(left, 1 << 16)))
                if not got:
                    break
                left -= got
            self.send_json(413, {"error": f"the body is {length} bytes, over this server's limit of {limit} "
                                          "(--max-body-bytes): send fewer or shorter contexts per request"})
            return None
        return self.rfile.read(length)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, an unknown method, headers too long) as JSON,
        like every other answer of this server, not its HTML page; with a status line and headers even
        when the request line was too broken to say its HTTP version."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        try:
            self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})
        except OSError:
            pass  # the client is gone

    def handle(self):
        """One connection; a client that hangs up or stalls mid-request costs one log line, not a traceback."""
        self.server.in_flight(+1)
        try:
            super().handle()
        except (ConnectionError, TimeoutError) as e:
            self.log_message("connection dropped: %s", type(e).__name__)
        finally:
            self.server.in_flight(-1)

    def send_json(self, status, obj, headers=None):
        self.send(status, strict_json(obj).encode(), "application/json", headers)

    def send(self, status, data, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.server.cors is not None:
            self.send_header("Access-Control-Allow-Origin", self.server.cors)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":  # a response to HEAD has GET's headers, never a body (RFC 9110, 9.3.2)
            self.wfile.write(data)
        self.server.metrics.count("tinyqa_requests_total", path=self.path.split("?", 1)[0][:40], code=status)

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)


class QAServer(ThreadingHTTPServer):
    """The HTTP server, its model thread (Batcher) and its metrics. Request threads are not daemons and
    server_close joins them, so a shutdown finishes every request in flight."""
    daemon_threads = False
    block_on_close = True

    def __init__(self, address, qa, backlog=1024, **kw):
        self.request_queue_size = backlog  # the listen backlog: connections held while every thread is busy
        super().__init__(address, Handler)
        self.metrics, self.draining, self.connections, self.lock = Metrics(), False, 0, threading.Lock()
        self.batcher = Batcher(qa.model, kw["batch_tokens"], kw["request_tokens"], kw["batch_wait_ms"] / 1000,
                               qa.batch_size, qa.device, on_pass=self._count_pass)
        self.qa = copy.copy(qa)  # the caller's answerer keeps running the model itself
        self.qa.runner = self.batcher.run
        self.max_body_bytes, self.cors, self.quiet = kw["max_body_bytes"], kw["cors"], kw["quiet"]
        self.model_label = kw["model_name"]
        self.allowed_hosts = {*LOCAL_HOSTS, *(h.lower() for h in kw["allow_hosts"])}
        if address[0] not in ("", "0.0.0.0", "::"):
            self.allowed_hosts.add(address[0].lower())
        cfg = qa.model.config
        self.model_info = {"name": kw["model_name"], "type": cfg.model_type, "layers": cfg.num_hidden_layers,
                           "hidden_size": cfg.hidden_size, "parameters": sum(p.numel() for p in qa.model.parameters())}
        self.calibrated = bool(qa.calibration.fitted_on)

    def answer(self, path, body) -> dict:
        """The JSON answer of a POST /answer or /read (TinyQAError: the client's mistake)."""
        if path == "/answer":
            pairs, options = parse_request(body)
            results = self.qa.answer_batch(pairs, **options)
            self.metrics.count("tinyqa_questions_total", len(pairs))
            return {"answers": [[asdict(a) for a in (r if isinstance(r, list) else [r])] for r in results]}
        question, documents, options = parse_read(body)
        answers = self.qa.read(question, documents, **options)
        self.metrics.count("tinyqa_questions_total")
        return {"answers": [asdict(a) for a in answers]}

    def _count_pass(self, windows, tokens, seconds):
        self.metrics.observe("tinyqa_batch_windows", windows)
        self.metrics.observe("tinyqa_batch_seconds", seconds)
        self.metrics.count("tinyqa_batch_tokens_total", tokens)

    def render_metrics(self) -> str:
        return self.metrics.render({"tinyqa_queue_windows": ("Windows waiting for the model.", self.batcher.queued),
                                    "tinyqa_connections": ("Connections being served.", self.connections)})

    def in_flight(self, change):
        with self.lock:
            self.connections += change

    def server_close(self):
        """Stop listening, finish the requests in flight (their threads are joined), then the model thread."""
        self.draining = True
        super().server_close()
        self.batcher.stop()


def make_server(qa, host="127.0.0.1", port=8000, max_body_bytes=1_000_000, model_name="", quiet=False,
                allow_hosts=(), cors=None, batch_tokens=None, request_tokens=None, batch_wait_ms=2.0, backlog=1024):
    """A QAServer answering with `qa` (port 0: any free port, see server.server_address). The model thread's
    passes (tinyqa/batcher.py) hold at most batch_tokens, request_tokens of each request: by default 4096
    and 256 on a CPU (a long request alone runs in short passes, so a newcomer waits little), 32768 and
    4096 on a GPU, which wants big passes."""
    cpu = qa.device.startswith("cpu")
    batch_tokens = batch_tokens or (4096 if cpu else 32 * 1024)
    request_tokens = request_tokens or (256 if cpu else 4096)
    return QAServer((host, port), qa, backlog, max_body_bytes=max_body_bytes, model_name=model_name, quiet=quiet,
                    allow_hosts=allow_hosts, cors=cors, batch_tokens=batch_tokens, request_tokens=request_tokens,
                    batch_wait_ms=batch_wait_ms)


def serve(qa, host="127.0.0.1", port=8000, model_name="", **kw):
    """Serve until SIGTERM or Ctrl-C, then stop accepting, finish what is in flight and exit."""
    try:
        server = make_server(qa, host, port, model_name=model_name, **kw)
    except OSError as e:
        raise TinyQAError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host")
    h, p = server.server_address[:2]
    print(f"serving {model_name} on http://{h if ':' not in h else f'[{h}]'}:{p}/ (Ctrl-C stops)", flush=True)

    def stop(signum, frame):
        print(f"{signal.Signals(signum).name}: finishing the requests in flight, accepting no more", file=sys.stderr,
              flush=True)
        threading.Thread(target=server.shutdown).start()  # shutdown() waits for serve_forever: another thread

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.serve_forever()
    finally:
        server.server_close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("stopped", file=sys.stderr)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tinyqa</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
  main { max-width: 52rem; margin: 2rem auto; padding: 0 1rem; }
  h1 { margin: 0 0 .2rem; } .model { color: #666; margin: 0 0 1rem; }
  label { display: block; margin: .8rem 0 .2rem; font-weight: 600; }
  textarea, input { width: 100%; box-sizing: border-box; font: inherit; padding: .4rem; }
  input[type=number] { width: 5rem; }
  button { margin-top: .8rem; font: inherit; padding: .4rem 1.2rem; }
  #context-view { white-space: pre-wrap; background: #fff; border: 1px solid #ddd; padding: .8rem; }
  mark { background: #ffe066; padding: 0 .1rem; }
  #answers li { cursor: pointer; } #answers li.shown { font-weight: 600; }
  .error { color: #b00020; }
</style>
</head>
<body>
<main>
<h1>tinyqa</h1>
<p class="model">extractive question answering with {{MODEL}}</p>
<form id="ask">
  <label for="context">Context</label>
  <textarea id="context" rows="10" placeholder="Paste the text to search for the answer"></textarea>
  <label for="question">Question</label>
  <input id="question" placeholder="Ask something the text answers">
  <label for="top_k">Answers</label>
  <input id="top_k" type="number" min="1" max="20" value="3">
  <button type="submit">Ask</button>
</form>
<p id="status" role="status"></p>
<section id="result" hidden>
  <h2>Answer: <span id="best"></span> <small>(score <span id="score"></span>)</small></h2>
  <div id="context-view"></div>
  <ol id="answers"></ol>
</section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);

// Offsets from the server count code points (Python's str indices); JavaScript strings count UTF-16
// units, so slice an array of code points, not the string.
function show(context, answers, i) {
  const a = answers[i], cps = Array.from(context), view = $("context-view");
  $("best").textContent = a.text === "" ? "(no answer)" : a.text;
  $("score").textContent = a.score.toFixed(4);
  const mark = document.createElement("mark");
  mark.textContent = cps.slice(a.start, a.end).join("");
  view.replaceChildren(cps.slice(0, a.start).join(""), ...(a.end > a.start ? [mark] : []),
                       cps.slice(a.end).join(""));
  [...$("answers").children].forEach((li, j) => li.classList.toggle("shown", j === i));
}

async function ask() {
  const context = $("context").value, question = $("question").value;
  const top_k = Math.max(1, parseInt($("top_k").value, 10) || 1);
  $("status").className = ""; $("status").textContent = "asking...";
  try {
    const r = await fetch("/answer", {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify({question, context, top_k})});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    const answers = body.answers[0];
    $("answers").replaceChildren(...answers.map((a, i) => {
      const li = document.createElement("li");
      li.textContent = (a.text === "" ? "(no answer)" : a.text) + " \\u2014 " + a.score.toFixed(4);
      li.addEventListener("click", () => show(context, answers, i));
      return li;
    }));
    show(context, answers, 0);
    $("result").hidden = false;
    $("status").textContent = "";
  } catch (e) {
    $("status").className = "error"; $("status").textContent = "error: " + e.message;
  }
}

$("ask").addEventListener("submit", (e) => { e.preventDefault(); ask(); });
// ?context=...&question=...[&top_k=...] fills the form and asks at once: a link to a question.
const params = new URLSearchParams(location.search);
for (const k of ["context", "question", "top_k"]) if (params.has(k)) $(k).value = params.get(k);
if (params.get("context") && params.get("question")) ask();
</script>
</body>
</html>
"""
