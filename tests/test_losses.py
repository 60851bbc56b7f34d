"""The SFT loss against values worked out by hand."""

import math

import torch

from rltune.logps import IGNORE_INDEX, linear_nll_sum, shift_labels
from rltune.losses import token_accuracy_sum, token_nll_sum


def test_shift_labels_moves_targets_one_left():
    labels = torch.tensor([[5, 6, 7, 8]])
    assert shift_labels(labels).tolist() == [[6, 7, 8, IGNORE_INDEX]]


def test_token_nll_sum_by_hand():
    """Vocabulary of 2. Sequence [0, 1, 1] with labels [-100, 1, 1] (the prompt token 0 has no
    loss). Logits at positions 0 and 1 predict tokens 1 and 2 (the labels 1 and 1):

      position 0: logits [0, 0]        -> p(1) = 1/2             -> nll = ln 2
      position 1: logits [ln 3, 0]     -> p(1) = 1/(3+1) = 1/4   -> nll = ln 4
      position 2: predicts past the end -> no loss

    sum = ln 2 + ln 4 = ln 8, over 2 tokens.
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 1]])
    for chunk_above in (1 << 26, 0):  # one fp32 cross-entropy, and chunked log-softmaxes
        nll, count = token_nll_sum(logits, labels, chunk_above=chunk_above)
        assert count.item() == 2
        assert math.isclose(nll.item(), math.log(8.0), rel_tol=1e-6)


def test_chunked_nll_has_the_same_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = IGNORE_INDEX
    grads = []
    for chunk_above in (1 << 26, 0):
        logits.grad = None
        nll, count = token_nll_sum(logits, labels, chunk_above=chunk_above)
        nll.backward()
        grads.append((nll.detach(), count, logits.grad.clone()))
    (a, ca, ga), (b, cb, gb) = grads
    assert ca.item() == cb.item() == 3 * 6 - 2  # each row predicts 6; row 0 ignores 2 of them
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_masked_tokens_do_not_contribute():
    """Masking the second target leaves only position 0's ln 2."""
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    nll, count = token_nll_sum(logits, labels)
    assert count.item() == 1
    assert math.isclose(nll.item(), math.log(2.0), rel_tol=1e-6)


def test_step_normalisation_weighs_every_token_equally():
    """Two micro-batches with 1 and 3 loss tokens: dividing each sum by the step's 4 tokens gives
    the mean over all 4 tokens, not the mean of the two micro-batch means."""
    a_logits = torch.zeros(1, 2, 2)  # one target, nll ln 2
    a_labels = torch.tensor([[IGNORE_INDEX, 0]])
    b_logits = torch.tensor([[[math.log(3.0), 0.0]] * 4])  # three targets of class 1: nll ln 4 each
    b_labels = torch.tensor([[IGNORE_INDEX, 1, 1, 1]])
    (na, ca), (nb, cb) = token_nll_sum(a_logits, a_labels), token_nll_sum(b_logits, b_labels)
    step_loss = (na + nb) / (ca + cb)
    assert math.isclose(step_loss.item(), (math.log(2) + 3 * math.log(4)) / 4, rel_tol=1e-6)


def test_token_accuracy_counts_only_labelled_positions():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])  # argmax 0, 1, 0
    labels = torch.tensor([[IGNORE_INDEX, 0, 0]])  # targets 0 (pos 0) and 0 (pos 1)
    assert token_accuracy_sum(logits, labels).item() == 1


def test_nll_from_hidden_states_equals_the_logits_path_with_gradients():
    """algo.fused_ce: the NLL, token count, correct count and the gradients of the hidden states
    and of the output weight equal those of the logits path, with chunks that split the
    labelled positions unevenly; unlabelled positions get no gradient."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[:, :4] = IGNORE_INDEX  # a prompt
    labels[2, 6:] = IGNORE_INDEX
    with torch.no_grad():
        labels[1, 6] = (hidden[1, 5] @ weight.T).argmax()  # at least one right prediction

    logits = hidden @ weight.T  # [3, 9, 50]
    nll, count = token_nll_sum(logits, labels)
    correct = token_accuracy_sum(logits, labels)
    grads = torch.autograd.grad(nll, (hidden, weight))

    fused, fused_count, fused_correct = linear_nll_sum(hidden, weight, labels, chunk_size=4)
    fused_grads = torch.autograd.grad(2.0 * fused, (hidden, weight))  # backward scales
    assert fused_count.item() == count.item() == 5 + 5 + 2  # labels 4-8, 4-8, 4-5
    assert fused_correct.item() == correct.item() >= 1
    torch.testing.assert_close(fused, nll, rtol=1e-6, atol=1e-5)
    for a, b in zip(grads, fused_grads, strict=True):
        torch.testing.assert_close(b, 2.0 * a, rtol=1e-5, atol=1e-5)
    assert fused_grads[0][:, :3].abs().max() == 0  # positions that predict prompt tokens
