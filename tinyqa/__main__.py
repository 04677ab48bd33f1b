"""Command line: `python -m tinyqa answer ...`, `serve` (a JSON endpoint and a page), `export` (ONNX) and `demo`.

    python -m tinyqa answer --question "Who wrote Hamlet?" --context @hamlet.txt [--top-k 3] [--json]
    python -m tinyqa answer --questions questions.txt --context @hamlet.txt     # one question a line -> JSONL
    cat pairs.jsonl | python -m tinyqa answer > answers.jsonl    # {"question", "context"} a line -> JSONL
    python -m tinyqa serve --model tinyroberta-mrqa --port 8000                  # http://127.0.0.1:8000/
    python -m tinyqa export --model tinyroberta-mrqa --onnx onnx/                 # model.onnx for ONNX Runtime

Many questions are read, answered and printed a chunk at a time (--chunk-size), so output appears while
input is still coming and memory does not grow with the input. JSON output is strict (RFC 8259: a
non-finite number is written as null); notices and skipped lines go to stderr, never into the JSON.
"""
import argparse
import collections
import dataclasses
import ipaddress
import json
import os
import sys

from .cli import (DTYPES, HelpFormatter, add_decoder_args, add_featurizer_args, add_inference_model_args,
                  nonneg_float, nonneg_int, positive_int)
from .answerer import text_problem
from .errors import TinyQAError, cli_errors
from .files import JSON_ERRORS, json_problem, strict_json


def add_model_args(p):
    """The model, the windows (default: the checkpoint's own) and the decoder: answer and serve."""
    add_inference_model_args(p)
    add_featurizer_args(p, card_defaults=False)
    g = p.add_argument_group("decoder")
    add_decoder_args(g)
    g.add_argument("--no-align-to-words", dest="align_to_words", action="store_false",
                   help="keep answers at token boundaries instead of widening them to whole words")


ANSWER_HELP = """Answer questions about contexts with an extractive QA model:
  --question Q --context C          one answer (plain text; --json for the details)
  --questions FILE --context C      one answer per line of FILE, as JSONL
  (neither)                         JSONL lines {"question": ..., "context": ...} on stdin, answered as JSONL
JSONL out has one line per question, in input order, with the input's other fields (an id, say) passed
through; with --top-k > 1 the answers are a list under "answers". An answer has text, score (the QA
pipeline's probability), start and end (character offsets into the context) and logit_score."""


def build_parser():
    p = argparse.ArgumentParser(prog="python -m tinyqa", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("answer", help="answer questions about a context (one, a file of them, or JSONL on stdin)",
                       description=ANSWER_HELP, formatter_class=HelpFormatter)
    g = a.add_argument_group("input")
    g.add_argument("--question", help="the question")
    g.add_argument("--questions", metavar="FILE", help="a file of questions, one a line ('-' for stdin), "
                   "all about --context")
    g.add_argument("--context", help="the text to find the answers in, or @FILE to read it from a file")
    g.add_argument("--documents", nargs="+", metavar="FILE",
                   help="read --question over many documents, one ranking across them: each FILE is a document "
                        "(its id: the file name), or a .jsonl file of {\"id\", \"text\"} objects or strings")
    g.add_argument("--no-answer", action="store_true",
                   help="with --documents, also rank the null answer: the probability that none of the top-k is right")
    g.add_argument("--top-k", type=positive_int, default=1, help="answers per question, best first")
    g.add_argument("--chunk-size", type=positive_int, default=64,
                   help="questions read and answered together before their answers are printed")
    g = a.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one answer as JSON (text, score, start, end, "
                   "logit_score; a list with --top-k > 1); many questions always give JSONL")
    add_model_args(a)
    s = sub.add_parser("serve", help="serve the answer API as JSON over HTTP, with a page to try it",
                       description="POST /answer (JSON: question(s), context(s) and the answer options), "
                                   "GET /health, GET / (a page: paste a context, ask, see the answer "
                                   "highlighted). Loopback only unless --host says otherwise; no authentication.",
                       formatter_class=HelpFormatter)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=nonneg_int, default=8000, help="port (0: any free port, printed)")
    s.add_argument("--max-body-bytes", type=positive_int, default=1_000_000,
                   help="larger requests are refused with 413")
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; localhost names and the "
                        "--host address are always allowed): any other Host is refused, against DNS rebinding")
    s.add_argument("--cors", metavar="ORIGIN", default=None,
                   help="let web pages from ORIGIN call the API (Access-Control-Allow-Origin); none by default")
    s.add_argument("--batch-tokens", type=positive_int, default=None,
                   help="most tokens of concurrent requests' windows in one forward pass (default: 4096 on a CPU, "
                        "32768 on a GPU)")
    s.add_argument("--request-tokens", type=positive_int, default=None,
                   help="most tokens one request brings to a pass, so that a long request runs in short passes and "
                        "a newcomer waits little (default: 256 on a CPU, 4096 on a GPU)")
    s.add_argument("--batch-wait-ms", type=nonneg_float, default=2.0,
                   help="how long the model waits for more requests to batch before it runs")
    s.add_argument("--backlog", type=positive_int, default=1024,
                   help="connections the operating system holds while all threads are busy")
    add_model_args(s)
    e = sub.add_parser("export", help="write the model as ONNX (model.onnx + config and tokenizer) for ONNX Runtime",
                       description="Export a QA checkpoint to ONNX: inputs input_ids, attention_mask (and token_type_ids "
                                   "for BERT/ELECTRA), outputs start_logits, end_logits, batch and sequence dynamic. "
                                   "Checked against tinyqa with onnxruntime when it is installed.",
                       formatter_class=HelpFormatter)
    e.add_argument("--model", default="tinyroberta-mrqa", help="alias, hub id or local checkpoint directory")
    e.add_argument("--onnx", required=True, metavar="DIR", help="folder to write model.onnx and the tokenizer files to")
    e.add_argument("--opset", type=positive_int, default=17, help="ONNX opset version (14 or later)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier export in --onnx (only its files)")
    c = sub.add_parser("calibrate", help="fit the model's confidence (and null threshold) on labelled data and "
                       "write calibration.json into its folder", description=CALIBRATE_HELP, formatter_class=HelpFormatter)
    c.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="labelled MRQA or SQuAD files to fit on (SQuAD 2.0 files also fit the null threshold)")
    c.add_argument("--heldout", nargs="+", default=[], metavar="FILE",
                   help="labelled files to report the calibration error on, before and after, without fitting on them")
    c.add_argument("--plot", metavar="PNG", help="write the reliability diagram here (needs matplotlib)")
    c.add_argument("--bins", type=positive_int, default=10, help="equal-width confidence bins of the calibration error")
    add_model_args(c)
    sub.add_parser("demo", add_help=False,
                   help="offline end to end: synthetic data, teacher, distilled and CE-only students, evaluation "
                        "(python -m tinyqa demo --help for its flags)")
    return p


def main(argv=None):
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    if args.command != "demo" and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    with cli_errors():
        if args.command == "demo":
            from . import demo
            demo.main(rest)
        elif args.command == "answer":
            answer_command(args) if not args.documents else read_command(args)
        elif args.command == "calibrate":
            calibrate_command(args)
        elif args.command == "serve":
            serve_command(args)
        elif args.command == "export":
            from .checks import check_output_dir
            from .export import export_command
            check_output_dir(args.onnx, "--onnx")
            export_command(args.model, args.onnx, args.opset, args.overwrite)


# --- answer

def answer_command(args):
    # Check the input before loading the model: a typo should not cost a model load.
    if args.question is not None and args.questions is not None:
        raise TinyQAError("give --question or --questions FILE, not both")
    if (args.question is not None or args.questions is not None) and args.context is None:
        raise TinyQAError("--context is missing: give the text (or @FILE) the questions are about")
    if args.question is None and args.questions is None and args.context is not None:
        raise TinyQAError("--context needs --question or --questions FILE (JSONL on stdin carries its own contexts)")
    context = read_context(args.context) if args.context is not None else None
    if args.question is not None and not args.question.strip():
        raise TinyQAError("--question is empty: give the question to answer")
    if args.questions is not None and args.questions != "-":
        lines = binary_lines(open_binary(args.questions, "--questions"), args.questions)
    elif args.questions == "-" or args.question is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise TinyQAError("no input: give --question and --context, --questions FILE and --context, "
                              'or pipe JSONL lines {"question": ..., "context": ...} into stdin')
        lines = binary_lines(sys.stdin.buffer, "stdin")
    qa = load_answerer(args)
    options = dict(top_k=args.top_k)
    try:
        if args.question is not None:
            print_one(qa.answer(args.question, context, **options), args.json)
            return
        skipped = []
        rows = question_rows(lines, context, skipped) if args.questions is not None else jsonl_rows(lines, skipped)
        qa.chunk_questions = args.chunk_size
        n = answer_rows(qa, rows, options, skipped)
    except BrokenPipeError:  # the reader has all it wants (`| head -1`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        sys.exit(0)
    if skipped:
        print(f"skipped {len(skipped)} line(s), answered {n}", file=sys.stderr)
    if n == 0:
        raise TinyQAError("no questions to answer in the input" + (" (every line was skipped)" if skipped else ""))


def answer_rows(qa, rows, options, skipped) -> int:
    """Answer the (where, row) pairs a chunk at a time and print one JSON line per row, in input order: its fields but the
    context, and its answer's. answer_stream reads the rows lazily: their pairs go to the model, the rows
    wait in `pending` for their answers, which come back in the same order."""
    pending, n = collections.deque(), 0

    def pairs():
        for where, row in rows:
            pending.append((where, row))
            yield row["question"], row["context"]

    for answers in qa.answer_stream(pairs(), **options):
        where, row = pending.popleft()
        out = {k: v for k, v in row.items() if k != "context"}
        if isinstance(answers, list):
            out["answers"] = [dataclasses.asdict(a) for a in answers]
        else:
            out.update(dataclasses.asdict(answers))
        try:
            line = strict_json(out)
            line.encode("utf-8")
        except RecursionError:  # a passed-through field nested deeper than JSON can be written back
            skip(skipped, f"{where}: a field is nested too deeply to be written back (skipped)")
            continue
        except UnicodeEncodeError:  # a passed-through field or name holding a lone surrogate ("\ud800")
            skip(skipped, f"{where}: a field is not valid Unicode (a lone surrogate) and cannot be written back "
                          "as UTF-8 (skipped)")
            continue
        print(line, flush=True)
        n += 1
    return n


CALIBRATE_HELP = """Fit a checkpoint's confidence on labelled questions and write it into the checkpoint as
calibration.json, which answer, read, evaluate.py and serve then use:
  confidence = sigmoid((start_logit + end_logit - null score - offset) / temperature)   (uncalibrated: 1 and 0)
On SQuAD 2.0-style data the null answer's threshold is fitted too (run_qa's null_score_diff_threshold,
chosen for the best F1). Prints the expected calibration error before and after, on --data and on every
--heldout set; --plot draws the reliability diagram."""


def calibrate_command(args):
    import os

    from .calibrate import calibrate, check_plot
    from .checks import check_input_files, check_output_file
    if not os.path.isdir(args.model):
        raise TinyQAError(f"--model {args.model}: calibrate writes calibration.json into the checkpoint: give its "
                          "local directory (an alias or hub id lives in the read-only hub cache)")
    if not os.access(args.model, os.W_OK):
        raise TinyQAError(f"--model {args.model}: not writable (permission denied)")
    check_input_files(args.data, "--data")
    check_input_files(args.heldout, "--heldout")
    check_output_file(args.plot, "--plot")
    check_plot(args.plot)
    qa = load_answerer(args)
    calibrate(qa, args.model, args.data, args.heldout, bins=args.bins, plot=args.plot, batch_size=args.batch_size,
              device=args.device)


def read_command(args):
    """--question over --documents: the answers of one ranking across them, printed as JSON (or text)."""
    if args.question is None or args.context is not None or args.questions is not None:
        raise TinyQAError("--documents reads one --question over the documents: give --question, not --context "
                          "or --questions")
    documents = read_documents(args.documents)
    qa = load_answerer(args)
    answers = qa.read(args.question, documents, top_k=args.top_k, no_answer=args.no_answer)
    if args.json:
        print(strict_json([dataclasses.asdict(a) for a in answers]))
    else:
        for a in answers:
            print(f"{a.score:.4f}\t{a.document}\t{a.text}")


def read_documents(paths):
    """The documents of --documents: each file one document, its id the file name; a .jsonl file many."""
    docs = []
    for path in paths:
        f = open_binary(path, "--documents")
        with f:
            if not path.endswith(".jsonl"):
                try:
                    docs.append({"id": path, "text": f.read().decode("utf-8-sig")})
                except UnicodeDecodeError as e:
                    raise TinyQAError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8")
                continue
            for where, line in binary_lines(f, path):
                if isinstance(line, UnicodeDecodeError):
                    raise TinyQAError(f"{where}: not UTF-8 text (byte {line.start})")
                if line.strip():
                    try:
                        docs.append(json.loads(line))
                    except JSON_ERRORS as e:
                        raise TinyQAError(f"{where}: {json_problem(e)}")
    return docs


def load_answerer(args):
    from .answerer import QuestionAnswerer
    from .decode import DecodeConfig
    from .infer import featurizer_config_of
    if args.quantize == "int8" and (args.dtype != "fp32" or not args.device.startswith("cpu")):
        raise TinyQAError("--quantize int8 runs on the CPU in fp32: drop --dtype/--device, or --quantize")
    fcfg = featurizer_config_of(args.model, max_seq_len=args.max_seq_len, doc_stride=args.doc_stride,
                                max_question_len=args.max_question_len)
    dcfg = DecodeConfig(max_answer_len=args.max_answer_len, handle_impossible_answer=args.handle_impossible_answer,
                        align_to_words=args.align_to_words)
    return QuestionAnswerer.from_pretrained(args.model, device=args.device, dtype=DTYPES[args.dtype],
                                            quantize=args.quantize, fcfg=fcfg, dcfg=dcfg, batch_size=args.batch_size)


def read_context(value):
    if not value.startswith("@"):
        text = value
    else:
        with open_binary(value[1:], "--context @FILE") as f:
            try:
                text = f.read().decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise TinyQAError(f"{value[1:]}: not UTF-8 text (byte {e.start}); convert it to UTF-8")
    if not text.strip():
        raise TinyQAError(f"{'the --context file ' + value[1:] if value.startswith('@') else '--context'} is "
                          "empty: give the text the questions are about")
    return text


def open_binary(path, flag):
    try:
        return open(path, "rb")
    except IsADirectoryError:
        raise TinyQAError(f"{path}: is a directory ({flag} takes a file)")
    except OSError as e:
        raise TinyQAError(f"{path}: cannot read it ({e.strerror}) ({flag})")


def binary_lines(f, name):
    """(where, text or the UnicodeDecodeError) of each line, decoded one at a time, so one line of binary or
    another encoding is one skipped line, not the end of the stream; a BOM is not part of line 1."""
    for lineno, raw in enumerate(f, 1):
        raw = raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw
        try:
            yield f"{name}:{lineno}", raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            yield f"{name}:{lineno}", e


def question_rows(lines, context, skipped):
    """{"question", "context"} rows from a file of questions, one a line; bad lines are reported skips."""
    for where, q in lines:
        problem = "not UTF-8 text" if isinstance(q, UnicodeDecodeError) else text_problem("question", q)
        if problem:
            skip(skipped, f"{where}: {problem} (skipped)")
            continue
        yield where, {"question": q, "context": context}


# What an answer line holds beside the input's own fields: an input field of one of these names would be
# overwritten, so such a line is refused rather than answered with its field silently replaced.
OUTPUT_FIELDS = ("text", "score", "start", "end", "logit_score", "confidence", "answers")


def jsonl_rows(lines, skipped):
    """{"question", "context", ...} rows from JSONL on stdin; malformed lines are reported skips."""
    for where, line in lines:
        if isinstance(line, UnicodeDecodeError):
            skip(skipped, f"{where}: not UTF-8 text (byte {line.start}) (skipped)")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except JSON_ERRORS as e:
            skip(skipped, f"{where}: {json_problem(e)} (skipped)")
            continue
        problem = row_problem(row)
        if problem:
            skip(skipped, f"{where}: {problem} (skipped)")
            continue
        yield where, row


def row_problem(row):
    if not isinstance(row, dict):
        return 'not a JSON object {"question": ..., "context": ...}'
    for key in ("question", "context"):
        if key not in row:
            return f"missing field '{key}'"
        problem = text_problem(key, row[key])
        if problem:
            return problem
    taken = [k for k in OUTPUT_FIELDS if k in row]
    if taken:
        return f"field '{taken[0]}' is also an answer field and would be overwritten: rename it"
    return None


def skip(skipped, message):
    skipped.append(message)
    print(message, file=sys.stderr, flush=True)


def print_one(answers, as_json):
    if as_json:
        obj = [dataclasses.asdict(a) for a in answers] if isinstance(answers, list) else dataclasses.asdict(answers)
        print(strict_json(obj))
    elif isinstance(answers, list):
        for a in answers:
            print(f"{a.score:.4f}\t{a.text}")
    else:
        print(answers.text)


# --- serve

def serve_command(args):
    from .server import serve
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"notice: listening on {args.host}, reachable from other machines; there is no authentication; "
              "requests must name this machine in their Host header: add its names with --allow-host", file=sys.stderr)
    # /health names the model without a local path: an alias or hub id as given, a folder by its name
    label = os.path.basename(os.path.normpath(args.model)) if os.path.exists(args.model) else args.model
    serve(load_answerer(args), args.host, args.port, model_name=label, max_body_bytes=args.max_body_bytes,
          allow_hosts=args.allow_host, cors=args.cors, batch_tokens=args.batch_tokens, request_tokens=args.request_tokens,
          batch_wait_ms=args.batch_wait_ms, backlog=args.backlog)


if __name__ == "__main__":
    main()
