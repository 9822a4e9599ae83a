"""Sampling against hand computations: temperature, top-k, greedy decoding, determinism, diversity."""

from __future__ import annotations

import math

import pytest
import torch

from normlab.config import get_preset
from normlab.data import Vocab
from normlab.errors import ConfigError
from normlab.model import build_model
from normlab.sample import Samples, diversity, next_token_distribution, sample_words


def test_temperature_divides_the_logits():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(4.0)]])
    torch.testing.assert_close(next_token_distribution(logits), torch.tensor([[1 / 7, 2 / 7, 4 / 7]]))
    # T = 0.5 squares the odds: 1 : 4 : 16
    torch.testing.assert_close(next_token_distribution(logits, 0.5), torch.tensor([[1 / 21, 4 / 21, 16 / 21]]))


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(4.0), -1.0]])
    torch.testing.assert_close(next_token_distribution(logits, top_k=2), torch.tensor([[0, 1 / 3, 2 / 3, 0]]))


def _model_and_vocab():
    vocab = Vocab.from_words(["abcdefghijklmnopqrstuvwxyz"])
    return build_model(get_preset("lesson-kaiming").model, len(vocab), seed=5), vocab


def test_top_1_sampling_is_greedy_decoding():
    model, vocab = _model_and_vocab()
    samples = sample_words(model, vocab, 3, top_k=1, seed=0)
    context, greedy = [0, 0, 0], []
    with torch.no_grad():
        for _ in range(50):  # independent greedy loop, one character at a time
            token = int(model(torch.tensor([context])).argmax())
            if token == 0:
                break
            greedy.append(token)
            context = context[1:] + [token]
    assert samples.words == [vocab.decode(greedy)] * 3


def test_same_seed_same_words_and_eval_mode_restored():
    model, vocab = _model_and_vocab()
    model.train()
    a = sample_words(model, vocab, 10, seed=1)
    assert a.words == sample_words(model, vocab, 10, seed=1).words
    assert a.words != sample_words(model, vocab, 10, seed=2).words
    assert model.training


def test_mean_entropy_of_a_uniform_model_is_log_vocab():
    model, vocab = _model_and_vocab()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every logit 0: the uniform distribution
    assert sample_words(model, vocab, 50, seed=0).mean_entropy == pytest.approx(math.log(27), rel=1e-5)


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (-1.0, None), (1.0, 0), (1.0, 28)])
def test_bad_sampling_options_are_refused(temperature, top_k):
    model, vocab = _model_and_vocab()
    with pytest.raises(ConfigError):
        sample_words(model, vocab, 5, temperature=temperature, top_k=top_k)


def test_diversity_by_hand():
    result = diversity(Samples(["ann", "bob", "ann", "eve"], mean_entropy=1.5), train_words=["bob", "carl"])
    assert result.share_unique == 3 / 4
    assert result.share_novel == 3 / 4  # ann, ann, eve
    assert result.mean_length == 3.0
    assert result.mean_entropy == 1.5


def test_greedy_decoding_takes_the_argmax_whatever_the_temperature():
    model, vocab = _model_and_vocab()
    context, expected = [0, 0, 0], []
    with torch.no_grad():
        for _ in range(50):  # an independent greedy loop, one character at a time
            token = int(model(torch.tensor([context])).argmax())
            if token == 0:
                break
            expected.append(token)
            context = context[1:] + [token]
    for temperature in (0.5, 1.0, 3.0):
        assert sample_words(model, vocab, 2, temperature=temperature, greedy=True).words == [vocab.decode(expected)] * 2


def test_many_words_are_drawn_in_chunks_from_one_generator(monkeypatch):
    from normlab import sample

    model, vocab = _model_and_vocab()
    monkeypatch.setattr(sample, "CHUNK", 4)
    eleven = sample_words(model, vocab, 11, seed=3).words
    assert len(eleven) == 11 and eleven[:8] == sample_words(model, vocab, 8, seed=3).words
    with pytest.raises(ConfigError, match="between 1 and 1,000,000"):
        sample_words(model, vocab, 1_000_001)


def test_a_model_with_non_finite_outputs_cannot_be_sampled():
    from normlab.errors import NonFiniteError

    model, vocab = _model_and_vocab()
    with torch.no_grad():
        model.layers[-1].bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        sample_words(model, vocab, 3)
