"""Supervised fine-tuning: next-token loss on the assistant turns of conversations (masks from the template)."""

from tunelab.methods.base import Method
from tunelab.methods.lm import causal_lm_loss, perplexity, trained_tokens

METHOD = Method(
    name="sft",
    data_kind="chat",
    loss=causal_lm_loss,
    weight=trained_tokens,
    eval_metrics=perplexity,
    describe="Supervised fine-tuning on conversations; loss on assistant turns.",
)
