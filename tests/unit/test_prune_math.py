"""The pruning math of infer/prune.py against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import UserError
from tunelab.infer.prune import (
    block_influence,
    layer_mask,
    layers_to_drop,
    nm_mask,
    parse_pattern,
    row_mask,
    top_indices,
    wanda_score,
)


def test_magnitude_prunes_the_smallest_weights_of_the_whole_layer():
    w = torch.tensor([[1.0, -5.0, 0.2], [3.0, 0.5, -2.0]])
    # |w| sorted: 0.2, 0.5, 1, 2, 3, 5; half of six: 0.2, 0.5, 1 go
    assert layer_mask(w.abs(), 0.5).tolist() == [[False, True, False], [True, False, True]]
    assert layer_mask(w.abs(), 0.2).tolist() == [[True, True, False], [True, True, True]]  # floor(1.2) = 1


def test_wanda_compares_within_each_output_row_on_activation_weighted_scores():
    w = torch.tensor([[1.0, -2.0, 4.0, 0.5], [2.0, 1.0, -1.0, 3.0]])
    sq = torch.tensor([16.0, 1.0, 0.25, 4.0])  # input norms 4, 1, 0.5, 2
    score = wanda_score(w, sq)
    assert score.tolist() == [[4.0, 2.0, 2.0, 1.0], [8.0, 1.0, 0.5, 6.0]]
    # each row loses its two lowest: row 0 drops 1.0 (col 3) and the first of the tied 2.0s (col 1)
    assert row_mask(score, 0.5).tolist() == [[True, False, True, False], [True, False, False, True]]
    # magnitude alone would keep -2 and 4 in row 0: the activations change the choice
    assert layer_mask(w.abs(), 0.5)[0].tolist() != row_mask(score, 0.5)[0].tolist()


def test_n_of_m_keeps_the_best_n_of_every_m_consecutive_inputs():
    score = torch.tensor([[0.1, 5.0, 3.0, 0.2, 1.0, 2.0, 3.0, 4.0]])
    assert nm_mask(score, 2, 4).tolist() == [[False, True, True, False, False, False, True, True]]
    assert nm_mask(score, 1, 2).tolist() == [[False, True, True, False, False, True, False, True]]
    with pytest.raises(ValueError, match="not a multiple of 3"):
        nm_mask(score, 1, 3)
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("unstructured") is None
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(UserError, match="--pattern"):
            parse_pattern(bad)


def test_layer_dropping_ranks_by_block_influence():
    assert block_influence(9.0, 10) == pytest.approx(0.1)
    # influences 0.3, 0.05, 0.2, 0.05: the two lowest (the tie broken toward the later layer)
    assert layers_to_drop([0.3, 0.05, 0.2, 0.05], 1) == [3]
    assert layers_to_drop([0.3, 0.05, 0.2, 0.05], 2) == [1, 3]
    assert top_indices(torch.tensor([0.5, 3.0, 1.0, 2.0]), 2).tolist() == [1, 3]
