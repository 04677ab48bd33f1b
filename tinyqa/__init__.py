"""tinyqa: a readable, pure-PyTorch TinyRoBERTa-MRQA and its model family (RoBERTa, BERT, ELECTRA, DeBERTa-v3):
model, MRQA data, evaluation, distillation."""
from .decode import Answer, DecodeConfig
from .errors import TinyQAError
from .features import FeaturizerConfig
from .infer import QuestionAnswerer
from .model import EncoderConfig, EncoderForQA, QAOutput, RobertaConfig, RobertaForQA
from .tokenizer import load_tokenizer
from .weights import ALIASES, load_model, save_pretrained

__all__ = ["TinyQAError", "Answer", "DecodeConfig", "FeaturizerConfig", "QuestionAnswerer", "QAOutput",
           "EncoderConfig", "EncoderForQA", "RobertaConfig", "RobertaForQA", "load_tokenizer", "ALIASES", "load_model",
           "save_pretrained"]
