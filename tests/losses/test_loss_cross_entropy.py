import pytest
import torch

from ssl_lightning.losses import labelled_cross_entropy

from helpers.gloo import assert_global_batch_value_and_gradients, loss_on_one_rank, run_on_two_ranks


def reference_labelled_cross_entropy(logits, labels, smoothing=0.0):
    """Row by row over the labelled images: (1 - e) * -log p_y + e * mean over classes of -log p_k."""
    total, count = 0.0, 0
    for row, label in zip(logits, labels):
        if label < 0:
            continue
        log_p = row - torch.log(torch.exp(row).sum())
        total = total + (1 - smoothing) * -log_p[label] + smoothing * -log_p.mean()
        count += 1
    return total / max(count, 1) if count else (logits * 0).sum()


def value_and_grad(loss_fn, logits, labels, smoothing):
    logits = logits.clone().requires_grad_(True)
    loss = loss_fn(logits, labels, smoothing)
    return loss, torch.autograd.grad(loss, logits)[0]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("labels", [[0, 2, 1, 3, 2], [-1, 2, -1, 0, 3], [3, -1, -1, -1, -1]])
def test_value_and_gradient_match_reference(labels, smoothing):
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(len(labels)), dtype=torch.float64)
    labels = torch.tensor(labels)
    actual = value_and_grad(labelled_cross_entropy, logits, labels, smoothing)
    expected = value_and_grad(reference_labelled_cross_entropy, logits, labels, smoothing)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_a_batch_without_labels_gives_zero_loss_and_zero_gradient():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = labelled_cross_entropy(logits, torch.full((3,), -1))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_equals_torch_cross_entropy_when_every_image_is_labelled():
    logits, labels = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 4, 1, 1, 3, 2])
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
    torch.testing.assert_close(labelled_cross_entropy(logits, labels, 0.2), expected)


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_two_ranks_give_the_global_batch_value_and_gradients(tmp_path):
    # Uneven shards, and rank 0 has no labelled image at all: a per-rank mean would be wrong here.
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 4, generator=generator, dtype=torch.float64),
              torch.randn(5, 4, generator=generator, dtype=torch.float64)]
    labels = [torch.tensor([-1, -1, -1]), torch.tensor([2, -1, 0, 3, 1])]
    results = run_on_two_ranks(loss_on_one_rank, tmp_path, labelled_cross_entropy, list(zip(logits, labels)), 0.1)
    loss, grad = value_and_grad(reference_labelled_cross_entropy, torch.cat(logits), torch.cat(labels), 0.1)
    assert_global_batch_value_and_gradients(results, loss, grad, [3, 5])
