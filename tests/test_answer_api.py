"""The answer API's input shapes, options, streaming and errors, and `python -m tinyqa answer`.

Hermetic (a tokenizer trained on generated text, a small random model). What the answers are is checked
against transformers' pipeline in test_answer_parity.py; here the oracle is the API itself: each shape,
chunking and command line must give exactly what `answer` gives for the same question and context.
"""
import json
import re
import subprocess
import sys
import threading

import pytest
from conftest import ROOT
from hermetic import tiny_checkpoint

from tinyqa import Answer, DecodeConfig, FeaturizerConfig, QuestionAnswerer, TinyQAError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return d, tiny_checkpoint(d)


@pytest.fixture(scope="module")
def qa(checkpoint):
    return QuestionAnswerer.from_pretrained(str(checkpoint[0]))


@pytest.fixture(scope="module")
def pairs(checkpoint):
    return [(q["question"], r["context"]) for r in checkpoint[1][:6] for q in r["qas"]]


def same(got, want):
    """Equal answers: texts and offsets exactly, scores to float32 rounding (a window batched with longer
    ones is padded, which moves its logits in the last bits)."""
    got, want = (got, want) if isinstance(want, list) else ([got], [want])
    assert [(a.text, a.start, a.end) for a in got] == [(a.text, a.start, a.end) for a in want]
    assert [x for a in got for x in (a.score, a.logit_score)] == pytest.approx(
        [x for a in want for x in (a.score, a.logit_score)], rel=1e-5, abs=1e-7)
    return True


def same_all(got, want):
    return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))


def test_input_shapes_and_options_agree_with_answer(qa, pairs):
    one = [qa.answer(q, c) for q, c in pairs]
    assert all(isinstance(a, Answer) and c[a.start:a.end] == a.text for a, (q, c) in zip(one, pairs))
    assert same_all(qa.answer_batch(pairs), one)
    assert same_all(qa.answer_batch([{"question": q, "context": c} for q, c in pairs]), one)
    assert same_all(qa.answer_batch([q for q, _ in pairs], [c for _, c in pairs]), one)
    q0, c0 = pairs[0]
    same_ctx = [q for q, c in pairs if c is c0]
    assert len(same_ctx) > 1 and same_all(qa.answer_batch(same_ctx, c0), [qa.answer(q, c0) for q in same_ctx])
    # top_k: a list, best first, no two answers with the same text; its first is the top_k=1 answer
    five = qa.answer(q0, c0, top_k=5)
    assert isinstance(five, list) and len(five) == 5 and five[0].text == one[0].text
    assert [a.score for a in five] == sorted([a.score for a in five], reverse=True)
    assert len({a.text.lower() for a in five}) == 5
    # per-call options change the answer and are per call only (the answerer's defaults stay)
    narrow = qa.answer(q0, c0, top_k=10, max_answer_len=2, align_to_words=False)
    offsets = qa.tokenizer.encode(c0, add_special_tokens=False).offsets
    assert 5 <= len(narrow) <= 10  # k = top_k candidates per window without alignment; equal texts merge
    assert all(1 <= sum(a.start <= s < a.end for s, _ in offsets) <= 2 for a in narrow)
    every = qa.answer(q0, c0, top_k=10**6, handle_impossible_answer=True, max_seq_len=40, doc_stride=8,
                      max_question_len=5)  # every distinct answer of every window, and the null answer once
    assert sum(a.text == "" and a.start == a.end == 0 for a in every) == 1 and len(every) > 100
    assert same(qa.answer(q0, c0), one[0]) and qa.dcfg == DecodeConfig() and qa.fcfg == FeaturizerConfig()


@pytest.mark.parametrize("call,message", [
    (lambda qa: qa.answer("", "text"), "input 0: the question is empty"),
    (lambda qa: qa.answer("Who?", " \n\t"), "input 0: the context is empty (only whitespace)"),
    (lambda qa: qa.answer(None, "text"), "input 0: question must be a string, not NoneType"),
    (lambda qa: qa.answer_batch([("a", "b"), ("c",)]), "input 1: expected a (question, context) pair"),
    (lambda qa: qa.answer_batch([{"question": "a"}]), "input 0: missing field 'context'"),
    (lambda qa: qa.answer_batch(["a", "b"], ["c"]), "2 questions but 1 contexts"),
    (lambda qa: qa.answer_batch("Who?"), "for one question use answer"),
    (lambda qa: qa.answer("a", "b", top_k=0), "top_k must be a whole number >= 1, not 0"),
    (lambda qa: qa.answer("a", "b", max_answer_len=1.5), "max_answer_len must be a whole number"),
    (lambda qa: qa.answer("a", "b", doc_stride=-1), "doc_stride must be a whole number >= 0"),
    (lambda qa: qa.answer("a", "b", handle_impossible_answer="yes"), "must be true or false"),
    (lambda qa: qa.answer("a", "b", max_seq_len=10_000), "longer than the model's 512 positions"),
    (lambda qa: qa.answer("a", "b", max_seq_len=64, doc_stride=60), "cannot overlap by doc_stride=60"),
])
def test_bad_input_is_a_clear_error(qa, call, message):
    with pytest.raises(TinyQAError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(qa)


def test_a_generator_is_read_lazily_a_chunk_at_a_time(qa, pairs):
    """100,000 pairs from a generator: the first answers come after one chunk was read, and reading never
    runs more than a chunk ahead of the answers handed out."""
    read = 0

    def many():
        nonlocal read
        for i in range(100_000):
            read += 1
            yield pairs[i % len(pairs)]

    stream = qa.answer_stream(many())
    assert read == 0  # nothing is read before the first answer is asked for
    expected = [qa.answer(q, c) for q, c in pairs]
    for n, a in enumerate(stream, 1):
        assert same(a, expected[(n - 1) % len(pairs)])
        assert read <= n - 1 + qa.chunk_questions
        if n == 150:
            break
    assert read < 150 + qa.chunk_questions


def test_one_context_is_tokenized_once_per_chunk(qa, pairs):
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(qa.tokenizer, name)

        def encode_batch(self, texts, **kw):
            calls.append(list(texts))
            return qa.tokenizer.encode_batch(texts, **kw)

    c = pairs[0][1]
    questions = [q for q, _ in pairs] * 3
    counting = QuestionAnswerer(qa.model, Counting())
    got = counting.answer_batch(questions, c)
    assert same_all(got, qa.answer_batch(questions, c))
    assert sum(texts.count(c) for texts in calls) == -(-len(questions) // qa.chunk_questions)
    # equal contexts that are different str objects (JSONL lines) are also tokenized once
    calls.clear()
    counting.answer_batch([(q, "".join(list(c))) for q in questions[:10]])
    assert sum(texts.count(c) for texts in calls) == 1


def test_contexts_of_any_length(qa, pairs):
    q, c = pairs[0]
    long = (c + " ") * 60  # ~60 windows
    a = qa.answer(q, long, top_k=3)
    assert all(long[x.start:x.end] == x.text for x in a)
    assert len(qa.answer_batch([(q, long)] * 3, top_k=3)) == 3


# --- the command line

def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "tinyqa", "answer", *map(str, args)], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def strict_loads(s):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(s, parse_constant=refuse)


def as_dict(a):
    return a.__dict__


def close(got, want):
    """JSON values equal, floats to float32 rounding (the CLI batches questions in its own chunks)."""
    if isinstance(want, float):
        return got == pytest.approx(want, rel=1e-5, abs=1e-7)
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(close(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(close(g, w) for g, w in zip(got, want))
    return got == want


def test_cli_one_question_plain_and_json(qa, checkpoint, pairs, tmp_path):
    q, c = pairs[0]
    (tmp_path / "ctx.txt").write_text(c, encoding="utf-8")
    r = run("--model", checkpoint[0], "--question", q, "--context", f"@{tmp_path / 'ctx.txt'}")
    assert r.returncode == 0 and r.stdout == qa.answer(q, c).text + "\n", r.stderr
    r = run("--model", checkpoint[0], "--question", q, "--context", c, "--json", "--top-k", "3",
            "--handle-impossible-answer", "--max-seq-len", "48", "--doc-stride", "16", "--max-answer-len", "4",
            "--no-align-to-words")
    assert r.returncode == 0, r.stderr
    want = qa.answer(q, c, top_k=3, handle_impossible_answer=True, max_seq_len=48, doc_stride=16,
                     max_answer_len=4, align_to_words=False)
    assert close(strict_loads(r.stdout), [as_dict(a) for a in want])


def test_cli_questions_file_and_stdin_jsonl(qa, checkpoint, pairs, tmp_path):
    c = pairs[0][1]
    qs = [q for q, cc in pairs if cc is c]
    (tmp_path / "qs.txt").write_text(qs[0] + "\n\n   \n" + "\n".join(qs[1:]) + "\n", encoding="utf-8")
    r = run("--model", checkpoint[0], "--questions", tmp_path / "qs.txt", "--context", c)
    assert r.returncode == 0, r.stderr
    lines = [strict_loads(x) for x in r.stdout.splitlines()]
    assert close(lines, [{"question": q, **as_dict(qa.answer(q, c))} for q in qs])
    assert "qs.txt:2: the question is empty (skipped)" in r.stderr and "qs.txt:3:" in r.stderr
    # JSONL on stdin: extra fields pass through, bad lines are reported skips, --top-k gives lists
    rows = [{"id": i, "question": q, "context": cc} for i, (q, cc) in enumerate(pairs[:5])]
    text = "\n".join([json.dumps(rows[0]), "{oops", json.dumps({"id": "x", "question": " ", "context": "c"}),
                      json.dumps(["not", "an", "object"]), json.dumps({"question": "q"})]
                     + [json.dumps(r) for r in rows[1:]]) + "\n"
    r = run("--model", checkpoint[0], "--top-k", "2", "--chunk-size", "2", stdin=text)
    assert r.returncode == 0, r.stderr
    want = [{"id": x["id"], "question": x["question"],
             "answers": [as_dict(a) for a in qa.answer(x["question"], x["context"], top_k=2)]} for x in rows]
    assert close([strict_loads(x) for x in r.stdout.splitlines()], want)
    for msg in ("stdin:2: not valid JSON", "stdin:3: the question is empty", "stdin:4: not a JSON object",
                "stdin:5: missing field 'context'", "skipped 4 line(s), answered 5"):
        assert msg in r.stderr, r.stderr


def test_cli_streams_answers_while_input_is_still_coming(checkpoint, pairs):
    """With --chunk-size 1, the first answer is printed before stdin is closed: it composes in pipelines."""
    p = subprocess.Popen([sys.executable, "-m", "tinyqa", "answer", "--model", str(checkpoint[0]), "--chunk-size", "1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        q, c = pairs[0]
        p.stdin.write(json.dumps({"question": q, "context": c}) + "\n")
        p.stdin.flush()
        got = []
        t = threading.Thread(target=lambda: got.append(p.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout=120)
        assert got and strict_loads(got[0])["question"] == q, p.stderr.read() if not t.is_alive() else "no answer yet"
        p.stdin.close()
        assert p.wait(timeout=60) == 0
    finally:
        p.kill()


@pytest.mark.parametrize("args,message", [
    (["--question", " ", "--context", "text"], "--question is empty"),
    (["--question", "Who?", "--context", "   "], "--context is empty"),
    (["--question", "Who?"], "--context is missing"),
    (["--context", "text"], "--context needs --question or --questions FILE"),
    (["--question", "a", "--questions", "f", "--context", "c"], "not both"),
    (["--question", "Who?", "--context", "@/no/such/file"], "/no/such/file: cannot read it"),
    (["--questions", "/", "--context", "c"], "/: is a directory"),
    (["--top-k", "0", "--question", "a", "--context", "b"], "argument --top-k: must be a positive integer, got 0"),
    (["--doc-stride", "-1", "--question", "a", "--context", "b"], "argument --doc-stride: must be an integer >= 0, got -1"),
    (["--max-seq-len", "x", "--question", "a", "--context", "b"], "must be a positive integer, got 'x'"),
])
def test_cli_bad_input_is_one_line_before_the_model_loads(args, message, capsys):
    from tinyqa.__main__ import main
    with pytest.raises(SystemExit) as e:  # in process: the model is never reached, the input is checked first
        main(["answer", "--model", "/no/such/model", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err
    assert err.count("\n") == 1 or err.startswith("usage:"), err


def test_cli_empty_stdin_and_help(checkpoint, capsys):
    from tinyqa.__main__ import main
    r = run("--model", checkpoint[0], stdin="")
    assert r.returncode == 2 and "no questions to answer" in r.stderr
    with pytest.raises(SystemExit) as e:
        main(["answer", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--top-k", "1"), ("--max-answer-len", "30"), ("--batch-size", "64"),
                          ("--chunk-size", "64"), ("--model", "tinyroberta-mrqa")):
        assert re.search(rf"{flag} \S+ .*?\(default: {default}\)", text), flag
    for flag in ("--max-seq-len", "--doc-stride", "--max-question-len", "--max-question-len", "--dtype",
                 "--quantize", "--handle-impossible-answer", "--no-align-to-words", "--questions", "--json"):
        assert flag in text


def test_strict_json_has_no_infinity():
    from tinyqa.files import strict_json
    assert strict_json({"score": float("-inf"), "x": [float("nan"), 1.5]}) == '{"score": null, "x": [null, 1.5]}'
