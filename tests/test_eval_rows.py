"""eval.py's rows at the model: hidden_states(at=...) (the last layer's output projection and MLP on the scored
positions alone) gives the full forward's hidden states at those positions, on packed rows and plain ones; cut
requests with the same cut context share one row."""

import pytest
import torch

import eval as evalpy
from model import ModelConfig, Transformer


def tiny_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=97, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32)).eval()


def test_hidden_states_at_equals_the_full_forward_at_those_positions():
    model = tiny_model()
    rows = [([1, 2, 3, 4, 5], [(0, [6, 7, 8]), (1, [9]), (2, [10, 11])]), ([12, 13], [(3, [14, 15, 16, 17])])]
    ids, positions, mask, where, _, _ = evalpy.pack_rows(rows, "cpu")
    with torch.no_grad():
        full = model.hidden_states(ids, positions=positions, mask=mask)
        assert torch.allclose(model.hidden_states(ids, positions=positions, mask=mask, at=where), full[where],
                              atol=1e-6, rtol=0)
        plain = torch.randint(0, 97, (2, 9))  # a causal forward, no mask
        at = (torch.tensor([0, 1, 1]), torch.tensor([8, 0, 5]))
        assert torch.allclose(model.hidden_states(plain, at=at), model.hidden_states(plain)[at], atol=1e-6, rtol=0)


def test_cut_requests_share_a_row_only_with_the_same_cut_context():
    """lm_eval cuts context + continuation to the last max_length + 1 tokens: two continuations as long have the
    same cut context (one row), a shorter one keeps more of it (a row of its own), as does the uncut context."""
    ctx, max_length = list(range(1, 31)), 32
    pairs = [(ctx, [40, 41, 42, 43]), (ctx, [50, 51, 52, 53]), (ctx, [60, 61, 62, 63, 64]), (ctx, [70, 71])]
    rows = evalpy.shared_context_rows(pairs, max_length)
    assert [[i for i, _ in branches] for _, branches in rows] == [[0, 1], [2], [3]]
    for row_ctx, branches in rows:
        for i, cont in branches:
            whole = (pairs[i][0] + cont)[-(max_length + 1):]
            assert row_ctx + cont == whole and len(row_ctx) + len(cont) <= max_length + 1


def test_a_continuation_longer_than_the_context_is_one_line(capsys):
    rows = evalpy.shared_context_rows([([1, 2], list(range(3, 19)))], 16)  # 16 tokens fit: one of context left
    assert rows == [([2], [(0, list(range(3, 19)))])]
    with pytest.raises(SystemExit) as e:
        evalpy.shared_context_rows([([1, 2], list(range(3, 20)))], 16)
    assert e.value.code == 2 and "continuation of 17 tokens, longer than the model's context (16)" in capsys.readouterr().err
