"""TRL's fused LM head, scoring only labelled positions on CPU (tasks/train/finetune.py,
score_labelled_positions_only): the same loss and gradients, fewer rows through the head."""

from __future__ import annotations

import pytest
import torch


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def loss_grads_rows(compact: bool, monkeypatch) -> tuple[float, list[torch.Tensor], list[int]]:
    """(loss, gradients, rows the head projected) of one assistant-only batch through TRL's head."""
    import trl.trainer.utils as fused
    from trl.trainer.utils import add_fused_lm_head

    # TRL's own rule, even when a stage of this process switched it already; undone after the test.
    monkeypatch.setattr(fused, "_use_triton", getattr(fused._use_triton, "original", fused._use_triton))
    if compact:
        from tasks.train.finetune import score_labelled_positions_only

        assert score_labelled_positions_only()
    rows: list[int] = []
    real = fused._ChunkedLogProbFunction.apply

    def counting(hidden, *args):
        rows.append(hidden.shape[0])
        return real(hidden, *args)

    monkeypatch.setattr(fused._ChunkedLogProbFunction, "apply", counting)
    model = tiny_model()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[:, 15:] = ids[:, 15:]  # the answer: the last 5 tokens of each row
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    out.loss.backward()
    return float(out.loss.detach()), [p.grad.clone() for p in model.parameters()], rows


def test_scoring_only_labelled_positions_changes_no_loss_or_gradient(monkeypatch):
    loss, grads, rows = loss_grads_rows(False, monkeypatch)
    assert rows == [3 * 19]  # TRL on CPU: every position but the last of each row
    with pytest.MonkeyPatch.context() as mp:
        c_loss, c_grads, c_rows = loss_grads_rows(True, mp)
    assert c_rows == [3 * 5]  # the switch: only the positions whose next token is an answer token
    assert c_loss == pytest.approx(loss, rel=1e-6)
    for a, b in zip(grads, c_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
