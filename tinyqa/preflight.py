"""Before any training work: every check that needs neither weights nor data, then the models' configs and
tokenizer against the windows and each other, then the model to train, built.

So a mistake costs seconds, not a teacher pass over 516k questions: files, device, --out and the window
settings first; then the trained model's and the teacher's positions, vocabularies, pad ids and token types
against the tokenizer (the teacher's own, when it has another); in the intermediate stage the layer map, in
the minilmv2 stage the teacher layer and the relation heads.
"""
import os
from dataclasses import replace
from typing import NamedTuple, Optional

from .catalog import resolve_dir
from .checks import check_device, check_featurizer, check_input_files, check_output_dir
from .cli import FINETUNE_CARD
from .errors import TinyQAError
from .features import check_model_fits, pair_layout
from .intermediate import check_layer_map, student_from_teacher_layers, uniform_layer_map
from .minilm import check_relation_setup
from .model import EncoderConfig, EncoderForQA
from .runs import check_fresh_out
from .tokenizer import load_tokenizer, tokenizer_fingerprint
from .weights import load_model, load_model_config, read_config


class Plan(NamedTuple):
    """What the checks found: local folders of the init weights, tokenizer and teacher, the trained model's
    config, the tokenizer, the intermediate stage's layer map, the minilmv2 stage's (teacher layer, relation
    heads), and the teacher's own tokenizer where it differs from the student's (prediction stage)."""
    dirs: dict
    config: EncoderConfig
    tokenizer: object
    layer_map: Optional[list] = None
    relation: Optional[tuple] = None
    teacher_tokenizer: object = None


def stage_of(args) -> str:
    return getattr(args, "stage", "prediction") if args.distill else "finetune"


def preflight(args) -> Plan:
    dirs = check_run(args)
    config, tokenizer, teacher_tokenizer = check_models(args, dirs)
    stage = stage_of(args)
    if stage in ("intermediate", "minilmv2"):
        teacher_cfg = load_model_config(dirs["teacher"])
        if stage == "intermediate":
            return Plan(dirs, config, tokenizer, layer_map=check_layer_map(teacher_cfg, config, args.layer_map))
        return Plan(dirs, config, tokenizer,
                    relation=check_relation_setup(teacher_cfg, config, args.teacher_layer, args.relation_heads))
    return Plan(dirs, config, tokenizer, teacher_tokenizer=teacher_tokenizer)


def check_run(args) -> dict:
    """Files, device, windows and --out, then the local folders of the init weights, the tokenizer and the
    teacher (downloaded when they are hub names)."""
    check_device(args.device)
    check_featurizer(args.max_seq_len, args.doc_stride, args.max_question_len)
    check_input_files(args.train, "--train")
    check_input_files(args.eval_data, "--eval-data")
    if args.init_config and not args.resume:
        check_input_files([args.init_config], "--init-config")
    check_output_dir(args.out, "--out")
    if not args.resume:
        check_fresh_out(args.out, args.overwrite)
    flag, name = ("--student", args.student) if args.distill else ("--model", args.model)
    from_teacher = args.distill and args.student_layers and not args.resume

    def resolve(name, flag, **what):
        if flag == "--model" and name == FINETUNE_CARD["model"] and not os.path.isdir(name):
            raise TinyQAError(f"--model {name}: no such directory (the default, where train_distill.py writes "
                              "its model: run it first, or pass --model)")
        return resolve_dir(name, flag=flag, **what)

    dirs = {"init": args.resume}  # on --resume, the weights and the tokenizer come from the checkpoint
    if args.distill:
        dirs["teacher"] = resolve_dir(args.teacher, model=True, tokenizer=True, flag="--teacher")
    if not args.resume and not args.init_config and not from_teacher:
        dirs["init"] = resolve(name, flag, model=True, tokenizer=False)
    if args.resume:
        dirs["tokenizer"] = args.resume
    elif args.tokenizer:
        dirs["tokenizer"] = resolve(args.tokenizer, "--tokenizer", model=False, tokenizer=True)
    elif from_teacher:  # a student made of the teacher's layers speaks the teacher's tokenizer
        dirs["tokenizer"] = dirs["teacher"]
    else:
        dirs["tokenizer"] = resolve(name, flag, model=False, tokenizer=True)
    return dirs


def check_models(args, dirs):
    """The trained model's config and tokenizer, checked against the windows and each other (and the
    teacher). Returns (config, tokenizer, the teacher's tokenizer where it is another one, else None)."""
    teacher_cfg = load_model_config(dirs["teacher"]) if args.distill else None
    if dirs["init"]:
        cfg = load_model_config(dirs["init"])
    elif args.init_config:
        cfg = read_config(args.init_config, "--init-config")  # any family, from its model_type
    else:  # --student-layers: the teacher's config with fewer layers
        uniform_layer_map(teacher_cfg.num_hidden_layers, args.student_layers, " (--student-layers)")  # or refused
        cfg = replace(teacher_cfg, num_hidden_layers=args.student_layers)
    tokenizer = load_tokenizer(dirs["tokenizer"])
    # now that the tokenizer says how many special tokens a window has: the exact room for context
    check_featurizer(args.max_seq_len, args.doc_stride, args.max_question_len, pair_layout(tokenizer).n_special)
    check_model_fits(cfg, tokenizer, args.max_seq_len, "the trained model")  # window, vocabulary, pad id, types
    if not args.distill:
        return cfg, tokenizer, None
    # Teacher and student may be of different families (BERT -> ELECTRA, ...); with a shared tokenizer the
    # teacher reads the student's very windows, else (prediction stage) its own tokens of the same text.
    teacher_tokenizer = load_tokenizer(dirs["teacher"])
    if tokenizer_fingerprint(teacher_tokenizer) == tokenizer_fingerprint(tokenizer):
        check_model_fits(teacher_cfg, tokenizer, args.max_seq_len, f"the teacher {args.teacher}")
        return cfg, tokenizer, None
    init = args.tokenizer or args.student
    stage = stage_of(args)
    if stage != "prediction":
        raise TinyQAError(f"teacher {args.teacher} and student {init} do not share a tokenizer: the {stage} stage "
                          "compares their layers position by position, so both must tokenize identically (the "
                          "prediction-layer stage, --stage prediction, distils across tokenizers)")
    if args.teacher_on_the_fly:
        raise TinyQAError(f"--teacher-on-the-fly: teacher {args.teacher} and student {init} do not share a "
                          "tokenizer, so the teacher reads its own windows of each question, computed once into the "
                          "teacher cache: leave out --teacher-on-the-fly")
    # the teacher reads up to all its positions: a stretch of context may take it more tokens than the student
    check_model_fits(teacher_cfg, teacher_tokenizer, teacher_cfg.max_window_len, f"the teacher {args.teacher}")
    return cfg, tokenizer, teacher_tokenizer


def build_model(args, plan: Plan, verbose=True):
    """The model to train (the caller has seeded torch), and what really initialised it, for args.json."""
    dirs = plan.dirs
    if args.resume:  # the weights come from the checkpoint; args.init from its args.json
        return load_model(args.resume, verbose=False), getattr(args, "init", None)
    if args.init_config:
        return EncoderForQA(plan.config), {"weights": f"random, seed {args.seed}",
                                           "config": os.path.abspath(args.init_config),
                                           "tokenizer": os.path.abspath(dirs["tokenizer"])}
    if args.distill and args.student_layers:
        model, layers = student_from_teacher_layers(load_model(dirs["teacher"], verbose=False), args.student_layers)
        return model, {"weights": f"the teacher's embeddings, layers {layers} (1-based) and QA head",
                       "teacher": os.path.abspath(dirs["teacher"]), "tokenizer": os.path.abspath(dirs["tokenizer"])}
    name = args.student if args.distill else args.model
    return load_model(dirs["init"], verbose=verbose), {"weights": os.path.abspath(dirs["init"]), "name": name,
                                                       "tokenizer": os.path.abspath(dirs["tokenizer"])}
