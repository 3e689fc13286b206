"""Inference and export: chat/generation with the training template, merging adapters into HF folders."""
