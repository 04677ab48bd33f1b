"""Fine-tune a QA model (RoBERTa, BERT, ELECTRA or DeBERTa-v3) on MRQA with the span cross-entropy loss only.

    python train_finetune.py --model runs/distill --out runs/finetune          # after train_distill.py
    python train_finetune.py --model DIR --train a.jsonl.gz b.jsonl.gz --epochs 3

Same loop, checkpoints, --resume and torchrun support as train_distill.py; defaults are the card's
fine-tuning stage (lr 1e-5, 3 epochs, batch 16, weight decay 0.01; FINETUNE_CARD in tinyqa/cli.py).
"""
from tinyqa.cli import finetune_args
from tinyqa.errors import cli_errors
from tinyqa.train import train


def main(argv=None):
    with cli_errors():
        train(finetune_args(argv, description=__doc__))


if __name__ == "__main__":
    main()
