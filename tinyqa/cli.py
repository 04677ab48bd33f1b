"""The command lines' shared parts: the help formatter, range-checked argparse types, the model card's
defaults, and the groups of flags each script builds its own parser from.

`distill_args` and `finetune_args` are train_distill.py's and train_finetune.py's whole command lines (the
demo and the tests call them too); evaluate.py and `python -m tinyqa` build theirs from the same groups, so
a flag has one name, one type and one help text wherever it appears. The names are the QA pipeline's
(max_seq_len, doc_stride, max_question_len, max_answer_len, handle_impossible_answer, top_k).
"""
import argparse
import math
import os
import sys

import torch

from .errors import TinyQAError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every flag's default (not the empty ones: None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def given_flags(parser, argv) -> list:
    """The dests of the flags argv names (`--lr 1e-4` or `--lr=1e-4`): --resume refuses those that would
    change the run instead of silently ignoring them. The parsers take no abbreviations, so a flag is
    named only by its own spelling."""
    named = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    return sorted({a.dest for a in parser._actions if named & set(a.option_strings)} - {"help"})


# --- argparse types: the parser refuses out-of-range values with its usual one-line `error:`

def _number(kind, test, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if not (isinstance(value, int) or math.isfinite(value)) or not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
seed_int = _number(int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2^32)")  # numpy's seed range
positive_float = _number(float, lambda v: v > 0, "a positive finite number")
nonneg_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
unit_float = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
finite_float = _number(float, lambda v: True, "a finite number")
learning_rate = _number(float, lambda v: 0 < v <= 1, "a learning rate in (0, 1]")  # AdamW's steps are about lr


def parse_layer_map(text: str) -> list:
    """`--layer-map 2,4,6`: 1-based teacher layers, one per student layer (checked against the models later)."""
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        layers = []
    if not layers or any(x < 1 for x in layers):
        raise argparse.ArgumentTypeError(f"must be 1-based teacher layers separated by commas, like 4,8,12; got {text!r}")
    return layers


# --- the model card's hyperparameters: the defaults of the training scripts

DISTILL_CARD = dict(
    teacher="roberta-large-mrqa",
    student="tinyroberta-squad2-step1",  # deepset's 6-layer student after its first distillation stage
    batch_size=96,
    epochs=4,
    lr=3e-5,
    warmup_proportion=0.2,  # LinearWarmup
    distillation_loss_weight=0.75,
    temperature=1.5,
    out="runs/distill",
)
# `--stage intermediate` (TinyBERT's first stage, which made deepset's tinyroberta-squad2-step1): its teacher
# and student are those of deepset's lineage (roberta-base-squad2 teaching the general-distilled 6-layer
# tinyroberta-6l-768d); lr 5e-5 and batch 32 are TinyBERT's task-distillation values (section 4.2), warmup
# 0.1 its task_distill.py default. Epochs are our choice: TinyBERT's 10-20 epochs were over GLUE sets a
# fraction of MRQA's 516,819 questions.
INTERMEDIATE_DEFAULTS = dict(
    teacher="roberta-base-squad2",
    student="tinyroberta-6l-768d",
    batch_size=32,
    epochs=3,
    lr=5e-5,
    warmup_proportion=0.1,
    out="runs/step1",
)
FINETUNE_CARD = dict(
    model="runs/distill",  # the distilled student that train_distill.py writes by default
    batch_size=16,
    epochs=3,
    lr=1e-5,
    warmup_proportion=0.2,
    out="runs/finetune",
)
# `--stage minilmv2` (MiniLMv2's relation distillation, Wang et al. 2021): a student that cannot start from the
# teacher's layers (another width or head count) learns the teacher's self-attention relations; the card's
# roberta-large-mrqa teaching deepset's 6 x 768 general-distilled student, then the prediction-layer stage.
# The optimisation is the intermediate stage's (both learn the teacher's inner workings on the task data).
MINILMV2_DEFAULTS = dict(INTERMEDIATE_DEFAULTS, teacher="roberta-large-mrqa", out="runs/minilmv2")
STAGES = {"prediction": DISTILL_CARD, "intermediate": {**DISTILL_CARD, **INTERMEDIATE_DEFAULTS},
          "minilmv2": {**DISTILL_CARD, **MINILMV2_DEFAULTS}}


# --- groups of flags

def add_featurizer_args(p, card_defaults=True):
    """Window settings. Training has the card's as defaults; inference None: the checkpoint's args.json
    (what it was trained with), else the card's."""
    g = p.add_argument_group("featurizer" if card_defaults else "featurizer (default: the checkpoint's args.json if "
                             "tinyqa trained it, else the model card's)")
    card = {"max_seq_len": 384, "doc_stride": 128, "max_question_len": 64}
    d = card if card_defaults else dict.fromkeys(card)
    note = (lambda k: "") if card_defaults else (lambda k: f" (card: {card[k]})")
    g.add_argument("--max-seq-len", type=positive_int, default=d["max_seq_len"],
                   help="tokens per window, special tokens included" + note("max_seq_len"))
    g.add_argument("--doc-stride", type=nonneg_int, default=d["doc_stride"],
                   help="overlap in tokens between consecutive windows of a long context" + note("doc_stride"))
    g.add_argument("--max-question-len", type=positive_int, default=d["max_question_len"],
                   help="question tokens kept, the rest is cut" + note("max_question_len"))
    return g


def add_decoder_args(g):
    g.add_argument("--max-answer-len", type=positive_int, default=30,
                   help="longest answer in tokens (run_qa's default; the 4.x pipeline's was 15)")
    g.add_argument("--handle-impossible-answer", action="store_true",
                   help="let the null answer (empty text) win: SQuAD 2.0-style models")


def add_inference_model_args(p, device="cpu"):
    """The model to run and how: evaluate.py, answer and serve."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tinyroberta-mrqa", help="alias, hub id or local checkpoint directory of a "
                   "RoBERTa, BERT, ELECTRA or DeBERTa-v3 QA model")
    g.add_argument("--device", default=device, help="torch device (cpu, cuda, cuda:1, mps)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights/compute dtype")
    g.add_argument("--quantize", choices=["int8"], default=None,
                   help="CPU only: dynamic int8 quantisation of the Linear layers (faster, slightly less accurate)")
    g.add_argument("--batch-size", type=positive_int, default=64, help="windows per forward pass (length-sorted)")
    return g


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _training_parser(description):
    """The flags both training scripts have: data, featurizer, optimisation, checkpoints (model flags are
    each script's own, added between data and featurizer)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("data")
    g.add_argument("--train", nargs="+", metavar="FILE",
                   help="MRQA .jsonl(.gz) or SQuAD .json training files (default: download the official MRQA train "
                        "split, from the release or the copy that TINYQA_MRQA_MIRROR or TINYQA_MRQA_SPLITS names)")
    g.add_argument("--limit", type=positive_int, default=None, help="use only the first N questions of each training file")
    g.add_argument("--skip-bad", action="store_true", help="skip malformed lines (counted and reported)")
    g.add_argument("--eval-data", nargs="+", metavar="FILE", help="files to score (EM/F1) after each epoch")
    return p, g


def _add_optimisation_args(p, defaults, note=lambda k: ""):
    g = p.add_argument_group("optimisation (model card defaults)")
    g.add_argument("--batch-size", type=positive_int, default=defaults["batch_size"],
                   help="windows per optimizer step, all GPUs together" + note("batch_size"))
    g.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches per optimizer step (per process), each a run of the step's windows "
                   "by length: the same gradient, less padding")
    g.add_argument("--epochs", type=positive_int, default=defaults["epochs"],
                   help="passes over the training windows" + note("epochs"))
    g.add_argument("--lr", type=learning_rate, default=defaults["lr"], help="peak learning rate" + note("lr"))
    g.add_argument("--warmup-proportion", type=unit_float, default=defaults["warmup_proportion"],
                   help="fraction of the optimizer steps spent warming the lr up linearly from 0"
                        + note("warmup_proportion"))
    g.add_argument("--weight-decay", type=nonneg_float, default=0.01, help="AdamW weight decay (none on biases, LayerNorm)")
    g.add_argument("--max-grad-norm", type=positive_float, default=1.0, help="gradient clipping norm")
    g.add_argument("--seed", type=seed_int, default=42, help="seed of init, data order and dropout")
    g.add_argument("--length-buckets", type=nonneg_int, default=0, metavar="N",
                   help="sort windows by length within shuffled chunks of N batches, so batches pad less (0: plain "
                        "random batches; it also groups windows by label, see epoch_batches in tinyqa/train.py)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype on CUDA (fp16 adds a GradScaler); CPU always trains in fp32")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")


def _add_run_args(p, defaults, note=lambda k: ""):
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--out", default=defaults["out"], help="output folder: final model, checkpoints, log.jsonl" + note("out"))
    g.add_argument("--save-every", type=nonneg_int, default=1000, help="checkpoint every N optimizer steps (0: only at the end)")
    g.add_argument("--resume", metavar="CHECKPOINT_DIR|auto",
                   help="continue a run from one of its checkpoints, in that run's folder and with its settings; "
                        "auto: from the newest complete checkpoint in --out, else start the run there (what "
                        "`torchrun --max-restarts N` needs, since it restarts a group with the same command line; "
                        "not the default, so that a command never continues a run it did not ask for)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its log, checkpoints and final model are deleted)")
    g.add_argument("--keep-checkpoints", type=nonneg_int, default=3, metavar="N",
                   help="keep only the newest N checkpoints (0: keep all)")
    g.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop after N optimizer steps as if killed (the schedule stays that of the full run)")
    g.add_argument("--feature-store", default=None, metavar="DIR",
                   help="folder of featurized training windows, built once and reused (default: "
                        "$TINYQA_CACHE/features, else ~/.cache/tinyqa/features)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_init_args(g):
    g.add_argument("--init-config", metavar="CONFIG_JSON",
                   help="start the trained model from random weights with this HF config.json instead")
    g.add_argument("--tokenizer", default=None, help="tokenizer (default: the trained model's own)")


def finetune_parser(description=""):
    p, _ = _training_parser(description)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=FINETUNE_CARD["model"], help="model to fine-tune: alias, hub id or directory")
    _add_init_args(g)
    add_featurizer_args(p)
    _add_optimisation_args(p, FINETUNE_CARD)
    _add_run_args(p, FINETUNE_CARD)
    return p


def distill_parser(stage="prediction", description=""):
    """train_distill.py's flags for one stage, with that stage's defaults (`--stage intermediate --help`
    shows them); each stage has only the flags it reads."""
    defaults = STAGES[stage]

    def note(k):  # the other stages' defaults where they differ from this one's
        other = [f"--stage {s}: {d[k]}" for s, d in STAGES.items() if s != stage and d[k] != defaults[k]]
        return f" ({'; '.join(other)})" if other else ""
    p, _ = _training_parser(description)
    g = p.add_argument_group("model")
    g.add_argument("--stage", choices=list(STAGES), default="prediction",
                   help="prediction: the card's stage, the student learns the teacher's start/end logits; "
                        "intermediate: TinyBERT's first stage, it learns the teacher's embeddings, hidden "
                        "states and attention scores, layer by layer; minilmv2: MiniLMv2's, its last layer learns "
                        "one teacher layer's self-attention relations, whatever the two widths and head counts "
                        "(each stage has its defaults and flags: --stage NAME --help)")
    g.add_argument("--teacher", default=defaults["teacher"],
                   help="teacher: alias, hub id or directory; in the prediction stage it may have another tokenizer "
                        "than the student (it then reads each window in its own tokens, and its start/end "
                        "distributions are carried to the student's through character offsets)" + note("teacher"))
    g.add_argument("--student", default=defaults["student"],
                   help="student init: alias, hub id or directory (a base LM gets a fresh QA head)" + note("student"))
    g.add_argument("--student-layers", type=positive_int, default=None, metavar="N",
                   help="start the student from N of the teacher's own layers instead (its embeddings, layers "
                        "k, 2k, ... with k = teacher layers / N, and its QA head)")
    _add_init_args(g)
    add_featurizer_args(p)
    _add_optimisation_args(p, defaults, note)
    if stage == "prediction":
        g = p.add_argument_group("distillation (the prediction layer)")
        g.add_argument("--distillation-loss-weight", type=unit_float, default=defaults["distillation_loss_weight"],
                       help="w in w * T^2 * KL + (1 - w) * CE")
        g.add_argument("--temperature", type=positive_float, default=defaults["temperature"],
                       help="T, softening both softmaxes")
        g.add_argument("--teacher-on-the-fly", action="store_true",
                       help="run the teacher per batch instead of caching its logits once (a teacher with the "
                            "student's tokenizer only)")
        g.add_argument("--teacher-cache", default=None,
                       help="folder of cached teacher logits, or of the carried probabilities of a teacher with "
                            "another tokenizer (default: $TINYQA_CACHE/teacher-logits, else "
                            "~/.cache/tinyqa/teacher-logits)")
        g.add_argument("--teacher-batch-size", type=positive_int, default=64, help="windows per teacher forward pass")
    elif stage == "minilmv2":
        g = p.add_argument_group("minilmv2 stage (loss = KL of the query-query, key-key and value-value relations)")
        g.add_argument("--teacher-layer", type=positive_int, default=None, metavar="L",
                       help="the 1-based teacher layer whose relations the student's last layer learns (default: "
                            "the last, or for teachers of 24 layers or more 7/8 of the depth: 21 of 24)")
        g.add_argument("--relation-heads", type=positive_int, default=None, metavar="A",
                       help="relation heads the queries, keys and values are regrouped into, for both models "
                            "(default: the most, up to 64, that divide both widths into heads of 4 features or more)")
    else:
        g = p.add_argument_group("intermediate stage (TinyBERT; loss = e * L_embedding + h * sum L_hidden + "
                                 "a * sum L_attention over the mapped layers)")
        g.add_argument("--layer-map", type=parse_layer_map, default=None, metavar="T1,T2,...",
                       help="the 1-based teacher layer each student layer learns from, hidden state and attention "
                            "(default: uniform, layers k, 2k, ... with k = teacher layers / student layers)")
        g.add_argument("--embedding-loss-weight", type=nonneg_float, default=1.0, help="e: MSE of the embedding outputs")
        g.add_argument("--hidden-loss-weight", type=nonneg_float, default=1.0,
                       help="h: MSE of the mapped hidden states (the student's projected to the teacher's width)")
        g.add_argument("--attention-loss-weight", type=nonneg_float, default=1.0,
                       help="a: MSE of the mapped layers' pre-softmax attention scores")
    _add_run_args(p, defaults, note)
    return p


def finetune_args(argv=None, description=""):
    """train_finetune.py's arguments, with args.given (the flags argv named) and args.distill = False."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    p = finetune_parser(description)
    args = p.parse_args(argv)
    args.given, args.distill = given_flags(p, argv), False
    return args


def distill_args(argv=None, description=""):
    """train_distill.py's arguments, parsed with the defaults and flags of the stage they name (--stage, or
    the stage of the run --resume continues); a flag of the other stage is refused, not ignored."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    stage = _stage_named(argv)
    p = distill_parser(stage, description)
    args, rest = p.parse_known_args(argv)
    for other_stage in (s for s in STAGES if s != stage and rest):
        other = distill_parser(other_stage)._option_string_actions
        foreign = [t.split("=", 1)[0] for t in rest if t.split("=", 1)[0] in other]
        if foreign:
            readers = [s for s in STAGES if foreign[0] in distill_parser(s)._option_string_actions]
            raise TinyQAError(f"{foreign[0]} is read by --stage {' and '.join(readers)} only, and this run is --stage "
                              f"{stage}: drop it, or change --stage")
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.given, args.distill = given_flags(p, argv), True
    if args.student_layers and ("student" in args.given or args.init_config):
        raise TinyQAError("--student-layers makes the student from the teacher's layers: drop "
                          f"{'--student' if 'student' in args.given else '--init-config'}, or --student-layers")
    return args


def _stage_named(argv) -> str:
    """--stage's value, else that of the checkpoint --resume names (its args.json), else prediction."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument("--stage")
    probe.add_argument("--resume")
    known, _ = probe.parse_known_args(argv)
    if known.stage:
        return known.stage if known.stage in STAGES else "prediction"  # the parser proper refuses it
    if known.resume:
        import json
        try:
            with open(os.path.join(known.resume, "args.json"), encoding="utf-8") as f:
                stage = json.load(f).get("stage")
            return stage if stage in STAGES else "prediction"
        except (OSError, ValueError, AttributeError):
            pass  # --resume reports what is wrong with the checkpoint
    return "prediction"
