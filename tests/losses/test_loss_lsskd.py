"""LSSKD's four terms against a float64 reference written with loops: values and gradients for every input,
the detached targets (the final classifier's distribution, the backbone's features), unlabelled rows
masked from the cross-entropies without a host sync, equal logits, one class, T 1 against 3, bad input and
two ranks."""

import pytest
import torch
import torch.distributed as dist

from ssl_lightning.losses.lsskd import lsskd_terms

from helpers.gloo import assert_global_batch_value_and_gradients, run_on_two_ranks
from helpers.host_syncs import HostSyncCounter

CLASSES, DIM, AUX = 3, 5, 2


def randn(*shape, seed=0, scale=2.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make_inputs(images, seed=0, classes=CLASSES):
    return {
        "logits": randn(images, classes, seed=seed),
        "aux_joint_logits": [randn(4 * images, 4 * classes, seed=seed + 1 + k) for k in range(AUX)],
        "feats": randn(4 * images, DIM, seed=seed + 10, scale=1.0),
        "aux_feats": [randn(4 * images, DIM, seed=seed + 20 + k, scale=1.0) for k in range(AUX)],
    }


def log_softmax_row(row, temperature=1.0):
    row = row / temperature
    return row - torch.log(torch.exp(row).sum())


def reference_terms(logits, aux_joint_logits, feats, aux_feats, labels, temperature):
    """Row by row: CE over labelled images; per branch, the joint CE over labelled rows 4i + j (label 4y + j),
    T^2 x the mean over every row of KL(softmax(f(x_i)/T) || softmax(c_l[4i + j, 4c + j]/T)) with the final
    logits detached, and the mean squared difference to the detached backbone features."""
    images, classes = logits.shape
    labelled = [i for i, y in enumerate(labels.tolist()) if y >= 0]
    zero = 0 * (logits.sum() + feats.sum() + sum(a.sum() for a in aux_joint_logits) + sum(f.sum() for f in aux_feats))
    ce = sum((-log_softmax_row(logits[i])[labels[i]] for i in labelled), zero) / max(len(labelled), 1)
    joint, kl, feature = zero, zero, zero
    for aux, aux_feat in zip(aux_joint_logits, aux_feats):
        joint_sum = zero
        for i in labelled:
            for j in range(4):
                joint_sum = joint_sum - log_softmax_row(aux[4 * i + j])[4 * labels[i] + j]
        joint = joint + joint_sum / max(4 * len(labelled), 1)
        kl_sum = zero
        for i in range(images):
            q_log = log_softmax_row(logits[i].detach(), temperature)
            for j in range(4):
                at_rotation = torch.stack([aux[4 * i + j, 4 * c + j] for c in range(classes)])
                kl_sum = kl_sum + (torch.exp(q_log) * (q_log - log_softmax_row(at_rotation, temperature))).sum()
        kl = kl + temperature**2 * kl_sum / (4 * images)
        squares = zero
        for r in range(4 * images):
            for d in range(feats.shape[1]):
                squares = squares + (aux_feat[r, d] - feats[r, d].detach()) ** 2
        feature = feature + squares / feats.numel()
    return ce, joint, kl, feature


def leaves(inputs):
    return [inputs["logits"], *inputs["aux_joint_logits"], inputs["feats"], *inputs["aux_feats"]]


def values_and_grads(terms_fn, inputs, labels, temperature):
    inputs = {k: [t.clone().requires_grad_(True) for t in v] if isinstance(v, list) else v.clone().requires_grad_(True)
              for k, v in inputs.items()}
    terms = terms_fn(**inputs, labels=labels, temperature=temperature)
    grads = []
    for term in terms:
        found = torch.autograd.grad(term, leaves(inputs), retain_graph=True, allow_unused=True)
        grads += [torch.zeros_like(x) if g is None else g for x, g in zip(leaves(inputs), found)]
    return list(terms), grads


def assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


LABELS = {"labelled": [0, 2, 1], "some unlabelled": [-1, 2, -1], "none labelled": [-1, -1, -1]}


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("labels", list(LABELS.values()), ids=list(LABELS))
def test_terms_and_gradients_match_the_reference(labels, temperature):
    inputs, labels = make_inputs(3), torch.tensor(labels)
    terms, grads = values_and_grads(lsskd_terms, inputs, labels, temperature)
    expected_terms, expected_grads = values_and_grads(reference_terms, inputs, labels, temperature)
    assert_same(terms, expected_terms)
    assert_same(grads, expected_grads)
    assert terms[2] > 1e-3 and terms[3] > 1e-3  # the label-free terms keep unlabelled rows


def test_the_targets_get_no_gradient_and_each_term_trains_what_it_should():
    inputs = make_inputs(3)
    _, grads = values_and_grads(lsskd_terms, inputs, torch.tensor([0, 2, 1]), 3.0)
    per_term = [grads[k * 6:(k + 1) * 6] for k in range(4)]  # leaves: logits, 2 aux logits, feats, 2 aux feats
    nonzero = [[bool(g.abs().max() > 0) for g in term] for term in per_term]
    assert nonzero == [
        [True, False, False, False, False, False],  # ce: the final classifier
        [False, True, True, False, False, False],  # joint: the auxiliary classifiers
        [False, True, True, False, False, False],  # kl: the auxiliary classifiers, not their target
        [False, False, False, False, True, True],  # feature: the branches, not the backbone's features
    ]


def test_equal_predictions_and_features_leave_no_kl_and_no_feature_term():
    # every auxiliary classifier reads, at each rotation, exactly the final classifier's logits
    inputs = make_inputs(2)
    logits = inputs["logits"]
    aux = logits.repeat_interleave(4, dim=1).repeat_interleave(4, dim=0)  # [4 B, 4 C], entry 4c + j = logits[i, c]
    inputs["aux_joint_logits"] = [aux.clone() for _ in range(AUX)]
    inputs["aux_feats"] = [inputs["feats"].clone() for _ in range(AUX)]
    labels = torch.tensor([1, 0])
    terms, grads = values_and_grads(lsskd_terms, inputs, labels, 3.0)
    assert_same(terms, values_and_grads(reference_terms, inputs, labels, 3.0)[0])
    assert terms[2].abs() < 1e-14 and terms[3] == 0
    assert all(g.abs().max() < 1e-14 for g in grads[12:])  # the KL's and the feature term's gradients


def test_one_class_leaves_the_rotation_task_and_the_features():
    inputs, labels = make_inputs(2, classes=1), torch.tensor([0, 0])
    terms, grads = values_and_grads(lsskd_terms, inputs, labels, 3.0)
    expected_terms, expected_grads = values_and_grads(reference_terms, inputs, labels, 3.0)
    assert_same(terms, expected_terms)
    assert_same(grads, expected_grads)
    assert terms[0].abs() < 1e-15 and terms[2].abs() < 1e-15 and terms[1] > 0.1 and terms[3] > 0.1


def test_masking_unlabelled_rows_makes_no_host_sync():
    inputs = {k: [t.float().requires_grad_(True) for t in v] if isinstance(v, list) else v.float().requires_grad_(True)
              for k, v in make_inputs(3).items()}
    counter = HostSyncCounter()
    counter.counting = True
    with counter:
        sum(lsskd_terms(**inputs, labels=torch.tensor([-1, 2, -1]))).backward()
    assert counter.total() == 0, dict(counter.seen)


def test_half_precision_inputs_give_float32_terms():
    inputs = {k: [t.bfloat16() for t in v] if isinstance(v, list) else v.bfloat16() for k, v in make_inputs(2).items()}
    assert all(t.dtype == torch.float32 for t in lsskd_terms(**inputs, labels=torch.tensor([0, 1])))


@pytest.mark.parametrize("change,match", [
    ({"logits": torch.zeros(2, 3)}, "logits \\[B, C\\] and integer labels \\[B\\]"),
    ({"feats": torch.zeros(6, 5)}, "feats \\[4 B, D\\] of the rotated batch = \\[12, D\\]"),
    ({"aux_feats": [torch.zeros(12, 5)]}, "one feature per auxiliary classifier"),
    ({"aux_joint_logits": [], "aux_feats": []}, "at least one"),
    ({"aux_joint_logits": [torch.zeros(12, 10)] * AUX}, "joint logits \\[4 B, 4 C\\] = \\[12, 12\\]"),
    ({"aux_feats": [torch.zeros(12, 4)] * AUX}, "features shaped as feats"),
    ({"temperature": 0.0}, "temperature > 0"),
])
def test_bad_inputs_are_refused_with_what_is_expected(change, match):
    inputs = {k: [t.float() for t in v] if isinstance(v, list) else v.float() for k, v in make_inputs(3).items()}
    with pytest.raises(ValueError, match=match):
        lsskd_terms(**{**inputs, "labels": torch.tensor([0, 1, 2]), **change})


# ----------------------------------------------------------------- two ranks
SHARDS = [1, 2]  # images per rank; rank 0 has no labelled image


def shard_inputs():
    return [make_inputs(n, seed=40 + n) for n in SHARDS], [torch.tensor([-1]), torch.tensor([2, 0])]


def terms_on_one_rank(inputs, labels):
    rank = dist.get_rank()
    terms, grads = values_and_grads(lsskd_terms, inputs[rank], labels[rank], 3.0)
    return [{"loss": t.detach(), "grad": torch.cat([g.flatten() for g in grads[6 * k:6 * (k + 1)]])}
            for k, t in enumerate(terms)]


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_two_ranks_give_the_global_batch_terms_and_gradients(tmp_path):
    inputs, labels = shard_inputs()
    results = run_on_two_ranks(terms_on_one_rank, tmp_path, inputs, labels)
    whole = {key: [torch.cat([shard[key][k] for shard in inputs]) for k in range(AUX)] if key.startswith("aux")
             else torch.cat([shard[key] for shard in inputs]) for key in inputs[0]}
    terms, grads = values_and_grads(lsskd_terms, whole, torch.cat(labels), 3.0)
    for k, term in enumerate(terms):
        assert term.abs() > 1e-3
        # each rank's flattened gradient: its rows of every leaf, in the leaves' order
        per_rank, starts = [], [0] * 6
        for n in SHARDS:
            parts = []
            for leaf, g in enumerate(grads[6 * k:6 * (k + 1)]):
                rows = n if leaf == 0 else 4 * n
                parts.append(g[starts[leaf]:starts[leaf] + rows].flatten())
                starts[leaf] += rows
            per_rank.append(torch.cat(parts))
        assert_global_batch_value_and_gradients([r[k] for r in results], term.detach(), torch.cat(per_rank),
                                                [p.numel() for p in per_rank])
