"""Conditioning: null conditions, dropout, batching."""

import pytest
import torch

from stepdistill.conditioning import Conditioning


def text_cond(b=3):
    return Conditioning(prompt_embeds=torch.randn(b, 5, 8), pooled_embeds=torch.randn(b, 4),
                        time_ids=torch.arange(6.0).repeat(b, 1), null_prompt_embeds=torch.zeros(1, 5, 8),
                        null_pooled_embeds=torch.ones(1, 4))


def test_class_null_and_drop():
    c = Conditioning.labels(torch.tensor([0, 3, 7]), null_class=10)
    assert c.kind == "class" and len(c) == 3
    assert c.null().class_labels.tolist() == [10, 10, 10]
    assert c.drop(torch.tensor([False, True, False])).class_labels.tolist() == [0, 10, 7]
    assert c.class_labels.tolist() == [0, 3, 7]  # not modified in place


def test_text_null_keeps_time_ids_and_expands_embeddings():
    c = text_cond()
    u = c.null()
    assert u.prompt_embeds.shape == (3, 5, 8) and float(u.prompt_embeds.abs().sum()) == 0
    assert torch.equal(u.pooled_embeds, torch.ones(3, 4))
    assert torch.equal(u.time_ids, c.time_ids)
    d = c.drop(torch.tensor([True, False, False]))
    assert float(d.prompt_embeds[0].abs().sum()) == 0
    assert torch.equal(d.prompt_embeds[1:], c.prompt_embeds[1:])


def test_cat_index_repeat_and_none():
    c = text_cond(2)
    both = Conditioning.cat([c, c.null()])
    assert len(both) == 4 and torch.equal(both.prompt_embeds[:2], c.prompt_embeds)
    assert torch.equal(c.repeat(2).prompt_embeds[1], c.prompt_embeds[0])
    assert len(c.index(slice(0, 1))) == 1
    n = Conditioning.none(5)
    assert n.kind == "none" and len(n.null()) == 5 and len(Conditioning.cat([n, n])) == 10
    assert len(n.index(slice(0, 2))) == 2


def test_missing_null_condition_is_a_clear_error():
    with pytest.raises(ValueError, match="empty-prompt"):
        Conditioning(prompt_embeds=torch.randn(2, 3, 4)).null()
    with pytest.raises(ValueError, match="null class"):
        Conditioning(class_labels=torch.tensor([1])).null()
