"""Stage 2, the network: the Llama-2 decoder and its KV caches (transformer), the one checkpoint loader, the
one device policy, the CPU matmul calibration and the likelihood of a token stream.

`from tinystories.model import Transformer` keeps working: the decoder's public names are re-exported here."""

from tinystories.model.transformer import (  # noqa: F401
    Attention,
    Block,
    FeedForward,
    KVCache,
    RMSNorm,
    SlotKVCache,
    Transformer,
    apply_rope,
    rope_table,
)
