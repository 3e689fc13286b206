"""Supervised fine-tuning: next-token loss on the assistant turns of conversations (masks from the template)."""

from tunelab.methods.base import Method
from tunelab.methods.lm import lm_loss, neftune_setup, perplexity, trained_tokens

METHOD = Method(
    name="sft",
    data_kind="chat",
    loss=lm_loss,
    setup=neftune_setup,
    weight=trained_tokens,
    eval_metrics=perplexity,
    describe="Supervised fine-tuning on conversations; loss on assistant turns.",
)
