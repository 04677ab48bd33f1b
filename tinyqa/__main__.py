"""Command line: `python -m tinyqa answer ...` (and `demo`, the offline end-to-end run)."""
import argparse
import json

from .errors import cli_errors


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tinyqa", description="tinyqa: extractive question answering")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("answer", help="answer one question about a context")
    a.add_argument("--model", default="tinyroberta-mrqa", help="alias, hub id or local checkpoint directory")
    a.add_argument("--question", required=True, help="the question")
    a.add_argument("--context", required=True, help="the text to find the answer in (or @FILE to read it from a file)")
    a.add_argument("--device", default="cpu", help="torch device")
    a.add_argument("--json", action="store_true", help="print the answer as JSON with score and char offsets")
    sub.add_parser("demo", add_help=False,
                   help="offline end to end: synthetic data, teacher, distilled and CE-only students, evaluation "
                        "(python -m tinyqa demo --help for its flags)")
    args, rest = p.parse_known_args(argv)
    if args.command != "demo" and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    with cli_errors():
        if args.command == "demo":
            from . import demo
            demo.main(rest)
        elif args.command == "answer":
            from .errors import TinyQAError
            from .infer import QuestionAnswerer
            context = args.context
            if context.startswith("@"):
                try:
                    with open(context[1:], encoding="utf-8") as f:
                        context = f.read()
                except OSError as e:
                    raise TinyQAError(f"{context[1:]}: cannot read the context file ({e.strerror})")
            ans = QuestionAnswerer.from_pretrained(args.model, device=args.device).answer(args.question, context)
            if args.json:
                print(json.dumps(ans.__dict__, ensure_ascii=False))
            else:
                print(ans.text)


if __name__ == "__main__":
    main()
