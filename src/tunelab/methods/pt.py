"""Continued pre-training: next-token loss on every token of plain text."""

from tunelab.methods.base import Method
from tunelab.methods.lm import lm_loss, neftune_setup, perplexity, trained_tokens

METHOD = Method(
    name="pt",
    data_kind="text",
    loss=lm_loss,
    setup=neftune_setup,
    weight=trained_tokens,
    eval_metrics=perplexity,
    describe="Continued pre-training on plain text; loss on every token.",
)
