"""FeatureQueue and IndexedMemory (components/memory.py): FIFO order, gathered writes on two gloo
ranks, checkpoint round trips and the errors at setup."""

import pytest
import torch
import torch.distributed as dist

from ssl_lightning.components.memory import FeatureQueue, IndexedMemory

from helpers.gloo import run_on_two_ranks


def fifo_reference(initial: torch.Tensor, pushes: list[torch.Tensor]) -> torch.Tensor:
    """The queue written plainly: a list of rows, append the new ones, keep the newest K, stored
    in ring order (row r holds the key pushed at a position congruent to r modulo K)."""
    size = initial.shape[0]
    rows = list(initial)
    written = 0
    for keys in pushes:
        for key in keys:
            rows[written % size] = key
            written += 1
    return torch.stack(rows)


def test_queue_is_fifo_over_steps():
    torch.manual_seed(0)
    queue = FeatureQueue(size=6, dim=3)
    initial = queue.features.clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(6))  # random unit vectors at the start
    pushes = [torch.full((2, 3), float(step)) for step in range(5)]  # 10 keys through 6 rows: wraps
    for step, keys in enumerate(pushes):
        queue.push(keys)
        torch.testing.assert_close(queue.features, fifo_reference(initial, pushes[: step + 1]))
    assert int(queue.position) == 10 % 6
    # the oldest surviving keys are from step 2; steps 0 and 1 are gone
    assert sorted({float(v) for v in queue.features[:, 0]}) == [2.0, 3.0, 4.0]


def test_loss_on_a_snapshot_survives_a_push_before_backward():
    queue = FeatureQueue(size=4, dim=2)
    query = torch.ones(1, 2, requires_grad=True)
    negatives = queue.snapshot()
    loss = (query @ negatives.T).sum()
    queue.push(torch.zeros(2, 2))  # MoCo's order: the loss is built, then this step's keys go in
    loss.backward()
    torch.testing.assert_close(query.grad, negatives.sum(dim=0, keepdim=True))


def test_queue_round_trips_through_a_state_dict():
    queue = FeatureQueue(size=4, dim=2)
    queue.push(torch.ones(2, 2))
    restored = FeatureQueue(size=4, dim=2)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.features, queue.features) and int(restored.position) == 2
    queue.push(torch.zeros(2, 2))
    restored.push(torch.zeros(2, 2))
    assert torch.equal(restored.features, queue.features)


def test_queue_must_be_divisible_by_the_global_batch_and_fit_the_data():
    queue = FeatureQueue(size=1000, dim=2)
    with pytest.raises(ValueError, match="MoCoV2: the queue size 1000 is not divisible by the global batch 256"):
        queue.check_fits(256, 50_000, owner="MoCoV2")
    with pytest.raises(ValueError, match=r"queue size 1000 is larger than the training set \(500 images\)"):
        queue.check_fits(100, 500)
    queue.check_fits(100, 50_000)
    with pytest.raises(ValueError, match="Cannot push 1001 keys into a queue of 1000"):
        queue.push(torch.zeros(1001, 2))


def _queue_on_two_ranks(size: int) -> dict:
    torch.manual_seed(0)  # the same initial queue on both ranks (DDP broadcasts it in a real run)
    queue = FeatureQueue(size=size, dim=3)
    rank = dist.get_rank()
    for step in range(3):
        queue.push(torch.full((2, 3), 10.0 * step + rank))
    return {"features": queue.features, "position": queue.position}


def test_queue_enqueues_the_keys_of_every_rank_in_rank_order(tmp_path):
    results = run_on_two_ranks(_queue_on_two_ranks, tmp_path, 8)
    torch.manual_seed(0)
    initial = FeatureQueue(size=8, dim=3).features
    global_pushes = [torch.cat([torch.full((2, 3), 10.0 * step + rank) for rank in (0, 1)]) for step in range(3)]
    expected = fifo_reference(initial, global_pushes)
    for result in results:
        torch.testing.assert_close(result["features"], expected)
        assert int(result["position"]) == 12 % 8


def test_memory_reads_what_was_written_and_keeps_the_rest():
    memory = IndexedMemory(size=5, shape=(2,), fill=-1.0)
    memory.write(torch.tensor([3, 0]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(memory.read(torch.tensor([0, 3, 1])), torch.tensor([[3.0, 4.0], [1.0, 2.0], [-1.0, -1.0]]))
    memory.write(torch.tensor([3]), torch.tensor([[5.0, 6.0]]))  # overwrites, does not blend with the old value
    torch.testing.assert_close(memory.read(torch.tensor([3])), torch.tensor([[5.0, 6.0]]))


def test_memory_round_trips_through_a_state_dict():
    memory = IndexedMemory(size=4)
    memory.write(torch.tensor([1, 2]), torch.tensor([0.5, 0.25]))
    restored = IndexedMemory(size=4)
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.values, torch.tensor([0.0, 0.5, 0.25, 0.0]))


def test_memory_index_out_of_range_or_wrong_shape_is_a_clear_error():
    memory = IndexedMemory(size=4)
    with pytest.raises(RuntimeError, match=r"IndexedMemory of 4 images got an index outside 0..3: batch\['index'\] must"):
        memory.read(torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match="got an index outside 0..3"):
        memory.write(torch.tensor([-1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"values of shape \(2, 3\) for 2 indices; expected \(2,\)"):
        memory.write(torch.tensor([0, 1]), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="1-d integer index"):
        memory.read(torch.tensor([0.0]))


def _memory_on_two_ranks(indices: list[list[int]]) -> torch.Tensor:
    rank = dist.get_rank()
    memory = IndexedMemory(size=6, shape=(2,), fill=-1.0)
    index = torch.tensor(indices[rank])
    memory.write(index, torch.stack([index.float() * 10 + rank, torch.full((len(index),), float(rank))], dim=1))
    return memory.values


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlap", [False, True], ids=["disjoint", "overlapping"])
def test_memory_writes_the_indices_of_every_rank(tmp_path, overlap):
    indices = [[0, 1, 2], [2, 3, 4]] if overlap else [[0, 1, 2], [3, 4, 5]]
    expected = torch.full((6, 2), -1.0)
    writes: dict[int, list[torch.Tensor]] = {}
    for rank, rows in enumerate(indices):
        for i in rows:
            writes.setdefault(i, []).append(torch.tensor([i * 10.0 + rank, float(rank)]))
    for i, values in writes.items():
        expected[i] = torch.stack(values).mean(dim=0)  # an image written by both ranks: the mean
    for values in run_on_two_ranks(_memory_on_two_ranks, tmp_path, indices):
        torch.testing.assert_close(values, expected)
