"""`python -m tinyqa serve`: the answer API as JSON over HTTP, and one page to try it. Standard library only.

    POST /answer   {"question": "Who wrote Hamlet?", "context": "Hamlet is ...", "top_k": 3}
                -> {"answers": [[{"text", "score", "start", "end", "logit_score"}, ...]]}
    GET  /health   {"status": "ok", "model": ...}
    GET  /         the page: paste a context, ask, see the answer highlighted with its score

A request holds one question or many, in the API's shapes: "question" and "context" each a string or a
list (a list of questions with one context shares it), or "inputs": [{"question", "context"}, ...]. The
options are the API's (top_k, max_answer_len, max_seq_len, doc_stride, max_question_len,
handle_impossible_answer, align_to_words). "answers" holds one list per question, in request order, of up
to top_k answers, best first; start and end are offsets in code points (Python's str indices).

Each request runs in its own thread (ThreadingHTTPServer), but the model runs under one lock: requests are
parsed and checked in parallel and answered one batch at a time, so concurrent requests can never mix
their answers. Bad requests get a JSON {"error": ...} with 400 (bad JSON, a missing or empty field, a bad
option), 411 (no Content-Length) or 413 (a body over --max-body-bytes, never read into memory).
"""
import html
import json
import re
import sys
import threading
import traceback
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import TinyQAError
from .files import JSON_ERRORS, json_problem, strict_json

OPTIONS = ("top_k", "max_answer_len", "max_seq_len", "doc_stride", "max_question_len", "handle_impossible_answer",
           "align_to_words")


def parse_request(body: bytes):
    """(pairs, options) of a POST /answer body; raises TinyQAError saying what is wrong."""
    from .answerer import pairs_of
    try:
        req = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TinyQAError(f"the body is not UTF-8 (byte {e.start})")
    except JSON_ERRORS as e:
        raise TinyQAError(f"the body is {json_problem(e)}")
    if not isinstance(req, dict):
        raise TinyQAError('the body must be a JSON object: {"question": ..., "context": ...}')
    unknown = sorted(set(req) - {"question", "context", "inputs", *OPTIONS})
    if unknown:
        raise TinyQAError(f"unknown field '{unknown[0]}' (fields: question, context, inputs, {', '.join(OPTIONS)})")
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


class Handler(BaseHTTPRequestHandler):
    server_version = "tinyqa"
    timeout = 60  # seconds a client may take to send its request: a stalled one cannot hold a thread forever

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/":
            self.send(200, PAGE.replace("{{MODEL}}", html.escape(self.server.model_name)).encode(),
                      "text/html; charset=utf-8")
        elif path == "/health":
            self.send_json(200, {"status": "ok", "model": self.server.model_name})
        elif path == "/answer":
            self.send_json(405, {"error": "POST a JSON body to /answer"}, {"Allow": "POST"})
        else:
            self.send_json(404, {"error": f"no such page {path}: try /, /health or POST /answer"})

    def do_POST(self):
        if self.path.split("?", 1)[0] != "/answer":
            return self.send_json(404, {"error": "POST to /answer"})
        length = self.headers.get("Content-Length")
        digits = length.strip(" \t") if length is not None else None  # HTTP's whitespace only: str.strip takes more
        if digits is None or not re.fullmatch(r"[0-9]{1,15}", digits):
            self.close_connection = True
            return self.send_json(411 if length is None else 400,
                                  {"error": "a Content-Length header (a whole number of bytes) is required"})
        length, limit = int(digits), self.server.max_body_bytes
        if length > limit:
            # Not read into memory, but drained (up to 16 MB) before the connection closes: closing a socket
            # with unread data makes the kernel reset it, and the client could lose the 413 with it.
            self.close_connection = True
            left = min(length, 16 << 20)
            while left > 0:
                got = len(self.rfile.read(min(left, 1 << 16)))
                if not got:
                    break
                left -= got
            return self.send_json(413, {"error": f"the body is {length} bytes, over this server's limit of {limit} "
                                                 "(--max-body-bytes): send fewer or shorter contexts per request"})
        body = self.rfile.read(length)
        try:
            pairs, options = parse_request(body)
            self.server.qa._configs(**options)  # bad option values are the client's error: check before the lock
            with self.server.lock:
                results = self.server.qa.answer_batch(pairs, **options)
        except TinyQAError as e:
            return self.send_json(400, {"error": str(e)})
        except Exception as e:  # a bug, not the client's fault: say so, and keep serving
            traceback.print_exc()
            return self.send_json(500, {"error": f"internal error ({type(e).__name__}): see the server's log"})
        answers = [[asdict(a) for a in (r if isinstance(r, list) else [r])] for r in results]
        self.send_json(200, {"answers": answers})

    def do_other(self):
        path = self.path.split("?", 1)[0]
        allow = {"/": "GET", "/health": "GET", "/answer": "POST"}.get(path)
        if allow is None:
            return self.send_json(404, {"error": f"no such page {path}: try /, /health or POST /answer"})
        self.send_json(405, {"error": f"{self.command} is not served here: {allow} {path}"}, {"Allow": allow})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = do_HEAD = do_other

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, an unknown method, headers too long) as JSON,
        like every other answer of this server, not its HTML page."""
        self.close_connection = True
        try:
            self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})
        except OSError:
            pass  # the client is gone

    def handle(self):
        """One connection; a client that hangs up or stalls mid-request costs one log line, not a traceback."""
        try:
            super().handle()
        except (ConnectionError, TimeoutError) as e:
            self.log_message("connection dropped: %s", type(e).__name__)

    def send_json(self, status, obj, headers=None):
        self.send(status, strict_json(obj).encode(), "application/json", headers)

    def send(self, status, data, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":  # a response to HEAD has GET's headers, never a body (RFC 9110, 9.3.2)
            self.wfile.write(data)

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)


def make_server(qa, host="127.0.0.1", port=8000, max_body_bytes=1_000_000, model_name="", quiet=False):
    """A ThreadingHTTPServer answering with `qa` (port 0: any free port, see server.server_address)."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.qa, server.lock, server.max_body_bytes = qa, threading.Lock(), max_body_bytes
    server.model_name, server.quiet = model_name, quiet
    return server


def serve(qa, host="127.0.0.1", port=8000, max_body_bytes=1_000_000, model_name=""):
    try:
        server = make_server(qa, host, port, max_body_bytes, model_name)
    except OSError as e:
        raise TinyQAError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host")
    h, p = server.server_address[:2]
    print(f"serving {model_name} on http://{h if ':' not in h else f'[{h}]'}:{p}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()


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
