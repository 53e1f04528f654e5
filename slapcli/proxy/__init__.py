"""The proxy model's side of slap, one job per module (data flows chat -> loss -> passes, chat/loss -> split):

- `chat`: a row as the proxy sees it: ChatML (or plain) token ids, the response mask, collation, length batches.
- `loss`: per-row response losses of a batch (and the end-token and tail terms), and of many rows without gradients.
- `passes`: loss passes over the rows an artifact records, streamed from the source and cached (stratify, ifd).
- `split`: the replay's split proxy: cached frozen prefix, trainable top blocks, gradient features, train step.

The names below are re-exported so that `from slapcli.proxy import ...` keeps working for stages and scripts.
"""

from slapcli.proxy.chat import (
    IGNORE_INDEX,
    EncodedExample,
    collate,
    encode_example,
    encode_examples,
    length_sorted_batches,
    token_budget_batches,
)
from slapcli.proxy.loss import (
    LOSS_TERMS,
    compute_loss_terms,
    compute_losses,
    response_loss_sum,
    response_loss_terms,
    response_losses,
)
from slapcli.proxy.passes import LossPass, cached_proxy_losses, proxy_losses
from slapcli.proxy.split import (
    CPU_FEATURE_TOKENS,
    FEATURE_BATCH,
    HiddenStore,
    PrefixCache,
    SplitProxy,
    decoder_blocks,
    feature_token_budget,
    row_features,
    train_step,
)

__all__ = [
    "CPU_FEATURE_TOKENS", "FEATURE_BATCH", "IGNORE_INDEX", "LOSS_TERMS", "EncodedExample", "HiddenStore", "LossPass",
    "PrefixCache", "SplitProxy", "cached_proxy_losses", "collate", "compute_loss_terms", "compute_losses",
    "decoder_blocks", "encode_example", "encode_examples", "feature_token_budget", "length_sorted_batches",
    "proxy_losses", "response_loss_sum", "response_loss_terms", "response_losses", "row_features",
    "token_budget_batches", "train_step",
]
