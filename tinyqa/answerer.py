"""The answer API: extractive QA over any context length, what transformers' question-answering pipeline gave.

    qa = QuestionAnswerer.from_pretrained("tinyroberta-mrqa")
    qa.answer("Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare.")
    # Answer(text='William Shakespeare', score=0.93, start=31, end=50, logit_score=17.2)
    qa.answer_batch([("Who?", c1), {"question": "When?", "context": c2}], top_k=3)

    qa.read("Who wrote Hamlet?", ["doc one ...", {"id": "b", "text": "doc two ..."}], top_k=3)
    # [DocumentAnswer(text='William Shakespeare', score=0.88, document='b', start=31, end=50, ...)]

`answer` decodes as the pipeline did, with its per-window probabilities (tinyqa/decode.py's
`answer_example`); `read` ranks the spans of many documents against each other with calibrated confidences
(`rank_documents`, tinyqa/calibration.py); both over the windows and logits of batched inference
(tinyqa/infer.py), or of whatever runs the model for them (`runner`: the server's batcher). Questions are
read, run and answered a chunk at a time, so a stream of any length is answered in bounded memory.
"""
from dataclasses import replace

import torch

from . import calibration as calibration_file
from .calibration import Calibration
from .catalog import resolve_dir
from .checks import check_device
from .cpu import pack_for_cpu, quantize_int8
from .decode import DecodeConfig, answer_example, rank_documents
from .errors import TinyQAError
from .examples import Example, unicode_problem
from .features import FeaturizerConfig, check_model_fits, featurize
from .infer import featurizer_config_of, run_model
from .tokenizer import load_tokenizer
from .weights import load_model


class QuestionAnswerer:
    """Extractive QA over any context length: what transformers' question-answering pipeline gave.

    Every answering method takes these options per call (defaults: the answerer's fcfg and dcfg, which
    from_pretrained takes from the checkpoint's args.json, else the model card's):
      top_k (1)                   answers per question, best first, no two with the same text
      max_answer_len (30)         longest answer in tokens (the 4.x pipeline's default was 15)
      max_seq_len (384)           tokens per window, special tokens included
      doc_stride (128)            overlap in tokens between consecutive windows of a long context
      max_question_len (64)       question tokens kept (run_qa's max_query_length)
      handle_impossible_answer    rank the null answer ("", 0, 0) among the others (SQuAD 2.0-style models)
      align_to_words (True)       widen answers to whole words
    An Answer's score is the pipeline's probability; logit_score is start_logit + end_logit; confidence is
    the calibrated probability that it is right (the checkpoint's calibration.json, else the model's own odds),
    comparable across contexts. `read` takes top_k, max_answer_len, the window options and no_answer.
    """

    # A chunk of questions is featurized, run and decoded together: at most this many questions, and
    # at most this many context characters summed over its questions (a long context repeated for many
    # questions makes that many windows), so memory stays bounded whatever the input's length.
    chunk_questions = 64
    chunk_chars = 2_000_000

    def __init__(self, model, tokenizer, fcfg=FeaturizerConfig(), dcfg=DecodeConfig(), batch_size=64, device="cpu",
                 calibration=None, runner=None):
        check_options(fcfg, dcfg)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TinyQAError(f"batch_size must be a whole number >= 1, not {batch_size!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.fcfg, self.dcfg, self.batch_size, self.device = fcfg, dcfg, batch_size, str(check_device(device))
        self.calibration = calibration or Calibration()
        # runner(features) -> (start logits, end logits) per window: batched inference here, the server's
        # batcher there (windows of concurrent requests in one forward pass)
        self.runner = runner or (lambda features: run_model(self.model, features, self.batch_size, self.device))

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.float32, quantize=None, fcfg=None,
                        prepack=True, **kw):
        """Load a checkpoint (alias, hub id or local directory) and its tokenizer. quantize="int8": dynamic
        int8 Linear layers (CPU). fcfg: window settings (default: the checkpoint's args.json, else the card's).
        prepack: fp32 on an AVX-512 CPU, run the Linears through oneDNN with packed weights (pack_for_cpu:
        faster there, logits within a few 1e-6; the model is then for inference only). Other keywords (dcfg,
        batch_size) go to the constructor."""
        if quantize not in (None, "int8"):
            raise TinyQAError(f"quantize={quantize!r}: the only quantisation is 'int8' (or None for none)")
        if not isinstance(prepack, bool):
            raise TinyQAError(f"prepack must be True or False, not {prepack!r}")
        model = load_model(name_or_path, device=device, dtype=dtype)
        if quantize == "int8":
            model = quantize_int8(model)
        elif prepack:
            model = pack_for_cpu(model)  # where it pays: fp32 on an AVX-512 CPU
        fcfg = fcfg or featurizer_config_of(name_or_path)
        kw.setdefault("calibration", calibration_file.load(resolve_dir(name_or_path, model=False, tokenizer=False)))
        return cls(model, load_tokenizer(name_or_path), fcfg=fcfg, device=device, **kw)

    def answer(self, question: str, context: str, top_k=None, max_answer_len=None, doc_stride=None,
               max_seq_len=None, max_question_len=None, handle_impossible_answer=None, align_to_words=None):
        """The best Answer to `question` in `context`, or a list of the top_k best when top_k > 1.
        Options as in the class docstring; None keeps the answerer's default."""
        return self.answer_batch([(question, context)], top_k=top_k, max_answer_len=max_answer_len,
                                 doc_stride=doc_stride, max_seq_len=max_seq_len, max_question_len=max_question_len,
                                 handle_impossible_answer=handle_impossible_answer, align_to_words=align_to_words)[0]

    def answer_batch(self, inputs, contexts=None, **options) -> list:
        """Answers for many questions at once, in input order: one Answer per question (a list of up to
        top_k when top_k > 1). `inputs` is a list of (question, context) pairs or {"question", "context"}
        dicts; or, with `contexts`, a list of questions and either one context for all of them (tokenized
        once) or a list of as many contexts. Options as in the class docstring."""
        return list(self.answer_stream(pairs_of(inputs, contexts), **options))

    def answer_stream(self, inputs, **options):
        """Like answer_batch, but lazily: `inputs` may be any iterable (a generator, a file's lines parsed
        on the fly) and is read a chunk of questions at a time, answers yielded as each chunk completes,
        so memory does not grow with the number of questions."""
        fcfg, dcfg = self._configs(**options)  # bad options fail here, not at the first answer
        check_model_fits(self.model.config, self.tokenizer, fcfg.max_seq_len)
        return self._stream(pairs_of(inputs, None), fcfg, dcfg)

    def _stream(self, pairs, fcfg, dcfg):
        while chunk := _take_chunk(pairs, self.chunk_questions, self.chunk_chars):
            yield from self._answer_chunk(chunk, fcfg, dcfg)

    def _answer_chunk(self, chunk, fcfg, dcfg):
        examples = [Example(str(i), q, c, []) for i, (q, c) in enumerate(chunk)]
        features = featurize(examples, self.tokenizer, fcfg, with_labels=False)
        starts, ends = self.runner(features)
        windows = [[] for _ in examples]
        for f, s, e in zip(features, starts, ends):
            windows[f.example_index].append((s, e, f.offsets, f.words))
        for ex, w in zip(examples, windows):
            answers = answer_example(ex.context, w, dcfg.top_k, dcfg.max_answer_len, dcfg.handle_impossible_answer,
                                     dcfg.align_to_words, self.calibration)
            yield answers[0] if dcfg.top_k == 1 else answers

    def read(self, question: str, documents, top_k=None, max_answer_len=None, max_seq_len=None, doc_stride=None,
             max_question_len=None, align_to_words=None, no_answer=False) -> list:
        """The top_k answers to `question` across `documents`, best first, as DocumentAnswers (text, score,
        document, start, end, logit_score): one ranking over every window of every document, scored by
        calibrated confidence (tinyqa/decode.py's rank_documents), the windows run in one batched pass.
        documents: strings, or {"text": ..., "id": ...} dicts (the id is a string or a number; without one,
        a document's id is its position). no_answer: also rank the null answer ("", document None), scored
        the probability that none of the others is right."""
        fcfg, dcfg = self._configs(top_k=top_k, max_answer_len=max_answer_len, max_seq_len=max_seq_len,
                                   doc_stride=doc_stride, max_question_len=max_question_len, align_to_words=align_to_words)
        if not isinstance(no_answer, bool):
            raise TinyQAError(f"no_answer must be true or false, not {no_answer!r}")
        problem = text_problem("question", question)
        if problem:
            raise TinyQAError(problem)
        texts, ids = documents_of(documents)
        check_model_fits(self.model.config, self.tokenizer, fcfg.max_seq_len)
        examples = [Example(str(i), question, text, []) for i, text in enumerate(texts)]
        features = featurize(examples, self.tokenizer, fcfg, with_labels=False)
        starts, ends = self.runner(features)
        windows = [(f.example_index, s, e, f.offsets, f.words) for f, s, e in zip(features, starts, ends)]
        return rank_documents(texts, ids, windows, self.calibration, dcfg.top_k, dcfg.max_answer_len, dcfg.n_best,
                              no_answer, dcfg.align_to_words)

    def _configs(self, top_k=None, max_answer_len=None, doc_stride=None, max_seq_len=None, max_question_len=None,
                 handle_impossible_answer=None, align_to_words=None):
        """(FeaturizerConfig, DecodeConfig) of one call: the answerer's, with the given options replaced."""
        fcfg = replace(self.fcfg, **_given(max_seq_len=max_seq_len, doc_stride=doc_stride,
                                           max_question_len=max_question_len))
        dcfg = replace(self.dcfg, **_given(top_k=top_k, max_answer_len=max_answer_len,
                                           handle_impossible_answer=handle_impossible_answer, align_to_words=align_to_words))
        check_options(fcfg, dcfg)
        return fcfg, dcfg


def check_options(fcfg, dcfg):
    """Every option of a call, whether given now or set on the answerer: whole numbers where counts are
    meant (True is not 1), booleans where switches are."""
    counts = {"top_k": dcfg.top_k, "max_answer_len": dcfg.max_answer_len, "n_best": dcfg.n_best,
              "max_seq_len": fcfg.max_seq_len, "max_question_len": fcfg.max_question_len}
    for name, v in {**counts, "doc_stride": fcfg.doc_stride}.items():
        least = 0 if name == "doc_stride" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise TinyQAError(f"{name} must be a whole number >= {least}, not {v!r}")
    for name in ("handle_impossible_answer", "align_to_words"):
        if not isinstance(getattr(dcfg, name), bool):
            raise TinyQAError(f"{name} must be true or false, not {getattr(dcfg, name)!r}")


def _given(**kw):
    return {k: v for k, v in kw.items() if v is not None}


def pairs_of(inputs, contexts=None):
    """(question, context) pairs from the accepted input shapes, checked one by one as they are read."""
    if isinstance(inputs, (str, dict)) or (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], str)):
        raise TinyQAError("answer_batch takes a list of (question, context) pairs or dicts; "
                          "for one question use answer(question, context)")
    if contexts is not None:
        questions = list(inputs)
        if isinstance(contexts, str):
            contexts = [contexts] * len(questions)  # the same str object: featurize tokenizes it once
        contexts = list(contexts)
        if len(questions) != len(contexts):
            raise TinyQAError(f"{len(questions)} questions but {len(contexts)} contexts: give as many, or one context")
        inputs = zip(questions, contexts)
    return (_checked(i, x) for i, x in enumerate(inputs))


def _checked(i, item):
    if isinstance(item, dict):
        missing = [k for k in ("question", "context") if k not in item]
        if missing:
            raise TinyQAError(f"input {i}: missing field '{missing[0]}' (give question and context)")
        q, c = item["question"], item["context"]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        q, c = item
    else:
        raise TinyQAError(f"input {i}: expected a (question, context) pair or a dict, not {type(item).__name__}")
    for name, v in (("question", q), ("context", c)):
        problem = text_problem(name, v)
        if problem:
            raise TinyQAError(f"input {i}: {problem}")
    return q, c


def text_problem(name, value):
    """Why `value` cannot be a question or context (None when it can): not a string, empty, or not valid
    Unicode (a lone surrogate such as "\\ud800", which JSON can spell but no tokenizer can encode)."""
    if not isinstance(value, str):
        return f"{name} must be a string, not {type(value).__name__}"
    if not value.strip():
        return f"the {name} is empty" + (" (only whitespace)" if value else "")
    problem = unicode_problem(value)
    return f"the {name} {problem}" if problem else None


def documents_of(documents):
    """(texts, ids) of read's documents, each checked: a string, or a {"text", "id"} dict."""
    if isinstance(documents, (str, dict)) or not hasattr(documents, "__iter__"):
        raise TinyQAError("documents must be a list of strings or {\"text\": ..., \"id\": ...} objects")
    texts, ids = [], []
    for i, doc in enumerate(documents):
        doc_id = i
        if isinstance(doc, dict):
            if "text" not in doc:
                raise TinyQAError(f"document {i}: missing field 'text'")
            doc_id = doc.get("id", i)
            if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
                raise TinyQAError(f"document {i}: 'id' must be a string or a whole number, not {type(doc_id).__name__}")
            doc = doc["text"]
        problem = text_problem("text", doc)
        if problem:
            raise TinyQAError(f"document {i}: {problem}")
        if doc_id in ids:
            raise TinyQAError(f"document {i}: id {doc_id!r} is also document {ids.index(doc_id)}'s: ids must be unique")
        texts.append(doc)
        ids.append(doc_id)
    if not texts:
        raise TinyQAError("no documents to read")
    return texts, ids


def _take_chunk(pairs, max_questions, max_chars):
    """The next pairs from the iterator, up to max_questions of them or max_chars of context in all (at
    least one). Equal contexts share one str object, so that featurize tokenizes each once."""
    chunk, chars, same = [], 0, {}
    for q, c in pairs:
        c = same.setdefault(c, c)
        chunk.append((q, c))
        chars += len(c)
        if len(chunk) == max_questions or chars >= max_chars:
            break
    return chunk


