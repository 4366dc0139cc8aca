"""Multi-head attention shared by every Transformer in medjax: now defined in `medjax.nn.transformer`
(this module keeps the old import path)."""
from medjax.nn.transformer import HeadsDense, MultiHeadAttention, softmax_attention

__all__ = ["HeadsDense", "MultiHeadAttention", "softmax_attention"]
