"""tinyqa: a readable, pure-PyTorch TinyRoBERTa-MRQA (model, MRQA data, evaluation, distillation)."""
from .errors import TinyQAError
from .infer import Answer, QuestionAnswerer
from .model import QAOutput, RobertaConfig, RobertaForQA
from .tokenizer import load_tokenizer
from .weights import ALIASES, load_model, save_pretrained

__all__ = ["TinyQAError", "Answer", "QuestionAnswerer", "QAOutput", "RobertaConfig", "RobertaForQA",
           "load_tokenizer", "ALIASES", "load_model", "save_pretrained"]
