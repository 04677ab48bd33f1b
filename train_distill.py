"""Prediction-layer distillation of a small QA student from a large teacher (TinyRoBERTa's recipe).

Teacher and student may be RoBERTa, BERT, ELECTRA or DeBERTa-v3 models of any two families. With different
tokenizers the teacher reads each window in its own tokens and its distributions are carried to the student's
(tinyqa/token_map.py); the intermediate and minilmv2 stages compare layers position by position and need a shared one.

    python train_distill.py --teacher roberta-large-mrqa                     # the card: MRQA train split
    python train_distill.py --teacher T --student S --train a.jsonl.gz --out runs/distill
    torchrun --nproc-per-node 8 train_distill.py --teacher roberta-large-mrqa    # DDP, same global batch

loss = w * T^2 * (KL_start + KL_end) + (1 - w) * (CE_start + CE_end) / 2   (see tinyqa/losses.py)
Teacher logits are computed once and cached on disk (float16); --teacher-on-the-fly skips the cache.
The defaults are the deepset/tinyroberta model card's hyperparameters (DISTILL_CARD in tinyqa/cli.py).
"""
from tinyqa.cli import distill_args
from tinyqa.errors import cli_errors
from tinyqa.train import train


def main(argv=None):
    with cli_errors():
        train(distill_args(argv, description=__doc__))


if __name__ == "__main__":
    main()
