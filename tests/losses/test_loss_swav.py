import pytest
import torch
import torch.distributed as dist

from ssl_lightning.losses.swav import swapped_prediction

from helpers.gloo import WORLD_SIZE, run_on_two_ranks


def reference_swav(scores, codes, temperature):
    """The official training loop's loss: each assigned crop's code predicted by every other crop."""
    num_crops, num_images, _ = scores.shape
    loss = 0.0
    for a in range(len(codes)):
        subloss = 0.0
        for v in range(num_crops):
            if v == a:
                continue
            for n in range(num_images):
                logits = scores[v, n] / temperature
                log_p = logits - torch.log(torch.exp(logits).sum())
                subloss = subloss - (codes[a, n] * log_p).sum() / num_images
        loss = loss + subloss / (num_crops - 1)
    return loss / len(codes)


def random_inputs(num_crops, num_assigned, num_images, num_prototypes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_crops, num_images, num_prototypes, generator=generator, dtype=torch.float64) * 2 - 1
    codes = torch.rand(num_assigned, num_images, num_prototypes, generator=generator, dtype=torch.float64)
    return scores, codes / codes.sum(dim=-1, keepdim=True)


def value_and_grad(loss_fn, scores, codes, temperature):
    scores = scores.clone().requires_grad_(True)
    loss = loss_fn(scores, codes, temperature)
    return loss, torch.autograd.grad(loss, scores)[0]


def assert_matches_reference(scores, codes, temperature):
    actual = value_and_grad(swapped_prediction, scores, codes, temperature)
    expected = value_and_grad(reference_swav, scores, codes, temperature)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_images, num_prototypes", [(1, 3), (4, 5), (7, 12)])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_two_crops_match_reference(num_images, num_prototypes, temperature):
    assert_matches_reference(*random_inputs(2, 2, num_images, num_prototypes, seed=num_images), temperature)


@pytest.mark.parametrize("num_assigned", [1, 2])
def test_multi_crop_averages_over_every_code_and_predicting_crop(num_assigned):
    # 2 global + 2 local crops: each code is predicted by the 3 other crops
    scores, codes = random_inputs(4, num_assigned, 5, 6, seed=1)
    assert_matches_reference(scores, codes, 0.1)
    pairs = [(a, v) for a in range(num_assigned) for v in range(4) if v != a]
    by_pair = [swapped_prediction(scores[[a, v]], codes[a : a + 1], 0.1) for a, v in pairs]
    torch.testing.assert_close(swapped_prediction(scores, codes, 0.1), sum(by_pair) / len(pairs), rtol=1e-12, atol=0)


def test_identical_crops_and_one_hot_codes_give_the_cross_entropy():
    scores = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64).repeat(2, 1, 1)
    labels = torch.arange(6) % 4
    codes = torch.nn.functional.one_hot(labels, 4).double().expand(2, 6, 4)
    assert_matches_reference(scores, codes, 0.1)
    expected = torch.nn.functional.cross_entropy(scores[0] / 0.1, labels)
    torch.testing.assert_close(swapped_prediction(scores, codes, 0.1), expected, rtol=1e-12, atol=0)


def test_no_gradient_reaches_the_codes():
    scores, codes = random_inputs(2, 2, 4, 5, seed=3)
    codes.requires_grad_(True)
    assert swapped_prediction(scores, codes).grad_fn is None  # scores need no grad, codes are detached


def test_bfloat16_scores_give_float32_loss_close_to_float64():
    scores, codes = random_inputs(4, 2, 32, 16, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = swapped_prediction(scores.bfloat16(), codes.bfloat16())
    assert low.dtype == torch.float32
    exact = swapped_prediction(scores.bfloat16().double(), codes.bfloat16().double())
    torch.testing.assert_close(low.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "scores_shape, codes_shape, kwargs, match",
    [((2, 4, 3), (2, 4, 2), {}, r"same N images and K prototypes, got \(2, 4, 3\) and \(2, 4, 2\)"),
     ((4, 3), (4, 3), {}, r"got \(4, 3\) and \(4, 3\)"),
     ((2, 4, 3), (2, 5, 3), {}, r"\(2, 4, 3\) and \(2, 5, 3\)"),
     ((2, 4, 3), (3, 4, 3), {}, "codes for 3 of 2 crops"),
     ((1, 4, 3), (1, 4, 3), {}, "at least 2 crops.*codes for 1 of 1 crops"),
     ((2, 4, 3), (2, 4, 3), {"temperature": 0.0}, "temperature > 0, got 0")],
)
def test_rejects_bad_input(scores_shape, codes_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        swapped_prediction(torch.randn(scores_shape), torch.rand(codes_shape), **kwargs)


def swav_on_one_rank(shards, temperature):
    scores, codes = shards[dist.get_rank()]
    scores = scores.clone().requires_grad_(True)
    loss = swapped_prediction(scores, codes, temperature)
    return {"loss": loss.detach(), "grad": torch.autograd.grad(loss, scores)[0]}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shard_sizes", [(3, 3), (2, 5)])
def test_two_ranks_give_the_global_batch_value_and_gradients(tmp_path, shard_sizes):
    scores, codes = random_inputs(4, 2, sum(shard_sizes), 6, seed=5)
    loss, grad = value_and_grad(swapped_prediction, scores, codes, 0.1)
    shards = list(zip(scores.split(shard_sizes, dim=1), codes.split(shard_sizes, dim=1)))
    results = run_on_two_ranks(swav_on_one_rank, tmp_path, shards, 0.1)
    # the images are the middle dimension: each rank's gradient is WORLD_SIZE x its columns
    for result, rows in zip(results, grad.split(shard_sizes, dim=1)):
        torch.testing.assert_close(result["loss"], loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result["grad"], WORLD_SIZE * rows, rtol=1e-10, atol=1e-12)
