"""tinyqa: a readable, pure-PyTorch TinyRoBERTa-MRQA and its model family (RoBERTa, BERT, ELECTRA, DeBERTa-v3):
model, MRQA data, evaluation, distillation."""
from .answerer import QuestionAnswerer
from .catalog import ALIASES
from .decode import Answer, DecodeConfig
from .errors import TinyQAError
from .features import FeaturizerConfig
from .model import EncoderConfig, EncoderForQA, QAOutput
from .tokenizer import load_tokenizer
from .weights import load_model, save_pretrained

__all__ = ["TinyQAError", "Answer", "DecodeConfig", "FeaturizerConfig", "QuestionAnswerer", "QAOutput",
           "EncoderConfig", "EncoderForQA", "load_tokenizer", "ALIASES", "load_model", "save_pretrained"]
