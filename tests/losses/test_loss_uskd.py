"""USKD's terms (Yang et al. 2023) against a plain reference (loops over rows and classes, float64) and
against the official USKDLoss written out: values and gradients of every term with respect to both heads'
logits, for both ranking flags; the Zipf labels' order and weights; the edge cases (equal logits, one and
two classes, a certain prediction, unlabelled rows); bad input; and two gloo ranks."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssl_lightning.losses.uskd import rank_scores, uskd_loss, uskd_terms, zipf_non_target_labels

from helpers.gloo import WORLD_SIZE, run_on_two_ranks


def reference_terms(logits, weak, labels, keep_target=False, rank_by="weak_and_final", eps=0.1):
    """Row by row over the labelled rows, class by class: -(S_y^2 + 1 - mean S_y^2) log S_y; the Zipf labels
    (1 / rank over the classes sorted by score, ties by class index; the target among them with keep_target)
    against the softmax over the non-target logits; the weak head's cross-entropy with 0.9 / 0.1 labels."""
    num_classes = logits.shape[1]
    rows = [(i, y) for i, y in enumerate(labels.tolist()) if y >= 0]
    zero = (logits * 0).sum() + (weak * 0).sum()
    if not rows:
        return zero, zero, zero
    squared = {i: (torch.softmax(logits[i].detach(), 0)[y] ** 2).item() for i, y in rows}
    mean_squared = sum(squared.values()) / len(rows)
    target, non_target, weak_term = zero, zero, zero
    for i, y in rows:
        log_s = torch.log_softmax(logits[i], 0)
        target = target - (squared[i] + 1 - mean_squared) * log_s[y]
        if rank_by == "final":
            score = [logits[i, c].item() for c in range(num_classes)]
        else:
            w = torch.softmax(weak[i].detach(), 0).tolist()
            ls = torch.log_softmax(logits[i].detach(), 0).tolist()
            score = [w[c] / (1 - w[y] + 1e-6) + ls[c] / (1 - ls[y] + 1e-6) for c in range(num_classes)]
        ranked = [c for c in range(num_classes) if keep_target or c != y]
        ranked = sorted(ranked, key=lambda c: -score[c])  # stable: ties keep class order
        zipf = {c: 1.0 / (k + 1) for k, c in enumerate(ranked) if c != y}
        total = sum(zipf.values())
        others = [c for c in range(num_classes) if c != y]
        log_mass = torch.logsumexp(torch.stack([logits[i, c] for c in others]), 0) if others else None
        for c in others:
            non_target = non_target - zipf[c] / total * (logits[i, c] - log_mass)
        log_w = torch.log_softmax(weak[i], 0)
        for c in range(num_classes):
            weak_term = weak_term - ((1 - eps) * (c == y) + eps / num_classes) * log_w[c]
    return target / len(rows), non_target / len(rows), weak_term / len(rows)


def official_loss(logit_s, w_fc, gt_label, alpha, beta, mu):
    """yzd-v/cls_KD's USKDLoss.forward written out for hard labels (the weak head's fc applied already;
    its zipf on the CPU): the target ranked among all classes, the log-softmax in the rank score."""
    label = gt_label.view(len(gt_label), 1)
    value = torch.ones_like(label)
    n, c = logit_s.shape
    s_i = F.softmax(logit_s, dim=1)
    s_t = torch.gather(s_i, 1, label)
    p_t = s_t**2
    p_t = (p_t + value - p_t.mean(0, True)).detach()
    s_i = F.log_softmax(logit_s, dim=1)
    s_t = torch.gather(s_i, 1, label)
    loss_t = -(p_t * s_t).sum(dim=1).mean()
    target = torch.zeros_like(logit_s).scatter_(1, label, 0.9) + 0.1 * torch.ones_like(logit_s) / c
    w_i = F.log_softmax(w_fc, dim=1)
    loss_weak = -(mu * target * w_i).sum(dim=1).mean()
    w_i = F.softmax(w_fc, dim=1)
    w_t = torch.gather(w_i, 1, label)
    rank = w_i / (1 - w_t.sum(1, True) + 1e-6) + s_i / (1 - s_t.sum(1, True) + 1e-6)
    _, rank = torch.sort(rank, descending=True, dim=-1)
    z_i = (1 / torch.arange(1, c + 1, dtype=logit_s.dtype)).repeat(n, 1)
    z_i = torch.gather(z_i, dim=1, index=torch.argsort(rank))
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    ns_i = F.log_softmax(logit_s[mask].reshape(n, -1), dim=1)
    nz_i = z_i[mask].reshape(n, -1)
    nz_i = (nz_i / nz_i.sum(dim=1, keepdim=True)).detach()
    loss_non = -(nz_i * ns_i).sum(dim=1).mean()
    return alpha * loss_t + beta * loss_non + loss_weak


def terms_and_grads(terms_fn, logits, weak, labels, *args):
    logits, weak = logits.clone().requires_grad_(True), weak.clone().requires_grad_(True)
    terms = terms_fn(logits, weak, labels, *args)
    grads = [g for t in terms for g in torch.autograd.grad(t, (logits, weak), retain_graph=True, allow_unused=True)]
    return [*terms, *[torch.zeros_like(logits) if g is None else g for g in grads]]


def assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def logits(rows, classes, seed, scale=2.0):
    return scale * torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


FLAGS = [(False, "weak_and_final"), (True, "weak_and_final"), (False, "final"), (True, "final")]


@pytest.mark.parametrize("keep_target,rank_by", FLAGS)
@pytest.mark.parametrize("labels", [[0, 5, 1, 3, 2], [-1, 2, -1, 0, 4], [3, -1, -1, -1, -1]])
def test_terms_and_gradients_match_the_reference(labels, keep_target, rank_by):
    s, w, labels = logits(5, 6, 0), logits(5, 6, 1), torch.tensor(labels)
    actual = terms_and_grads(uskd_terms, s, w, labels, keep_target, rank_by)
    assert_same(actual, terms_and_grads(reference_terms, s, w, labels, keep_target, rank_by))
    # the weak term trains the weak head only; the others the classifier only
    # (gradients: target by logits, by weak logits, then non-target's, then weak's)
    assert actual[3].abs().max() > 0 and actual[5].abs().max() > 0 and actual[8].abs().max() > 0
    assert actual[4].abs().max() == 0 and actual[6].abs().max() == 0 and actual[7].abs().max() == 0


@pytest.mark.parametrize("alpha,beta,mu", [(0.1, 0.1, 0.1), (1.0, 0.1, 0.005)])
def test_the_code_flag_matches_the_official_uskd_loss(alpha, beta, mu):
    s, w, labels = logits(6, 7, 2), logits(6, 7, 3), torch.tensor([0, 6, 3, 3, 1, 5])
    values = []
    for loss_fn, extra in ((uskd_loss, {"keep_target_in_non_target": True}), (official_loss, {})):
        s_, w_ = s.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = loss_fn(s_, w_, labels, alpha, beta, mu, **extra)
        values += [loss, *torch.autograd.grad(loss, (s_, w_))]
    assert_same(values[:3], values[3:])


def test_the_paper_and_the_code_rank_differ_when_the_target_is_not_first():
    # Class 0 is the target and ranks second by every score: the code's ranks of the classes below it move.
    s = torch.tensor([[2.0, 3.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([0])
    paper, code = (zipf_non_target_labels(s, labels, keep) for keep in (False, True))
    harmonic = [1, 1 / 2, 1 / 3, 1 / 4]
    torch.testing.assert_close(paper[0], torch.tensor(harmonic, dtype=torch.float64) / sum(harmonic))
    shifted = [1, 1 / 3, 1 / 4, 1 / 5]  # the target took rank 2
    torch.testing.assert_close(code[0], torch.tensor(shifted, dtype=torch.float64) / sum(shifted))
    assert not torch.allclose(uskd_loss(s, s, labels, rank_by="final"),
                              uskd_loss(s, s, labels, rank_by="final", keep_target_in_non_target=True))


@pytest.mark.parametrize("keep_target", [False, True])
def test_zipf_labels_follow_the_students_logit_order_and_weights(keep_target):
    num_classes = 8
    s = logits(4, num_classes, 4)
    s[:, 2] = 50.0  # the target ranks first: the code's ranks of the others start at 2, the paper's at 1
    labels = torch.full((4,), 2)
    z = zipf_non_target_labels(rank_scores(s, logits(4, num_classes, 5), labels, "final"), labels, keep_target)
    others = [c for c in range(num_classes) if c != 2]
    first = 2 if keep_target else 1
    harmonic = sum(1 / k for k in range(first, first + num_classes - 1))
    for row in range(4):
        order = sorted(range(num_classes - 1), key=lambda j: -s[row, others[j]].item())
        for rank, column in enumerate(order, start=first):
            assert z[row, column].item() == pytest.approx(1 / rank / harmonic, rel=1e-12)
        assert z[row].sum().item() == pytest.approx(1.0)
        # larger logit, larger soft label
        assert torch.equal(torch.argsort(z[row], descending=True), torch.argsort(s[row, others], descending=True))


def test_the_default_rank_mixes_the_weak_head_and_the_final_log_probabilities():
    # Equal final logits for classes 1 and 2: the weak head breaks the tie; with rank_by="final" class order does.
    s = torch.tensor([[5.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[0.0, 0.0, 3.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0])
    mixed = zipf_non_target_labels(rank_scores(s, w, labels), labels)
    final = zipf_non_target_labels(rank_scores(s, w, labels, "final"), labels)
    assert mixed[0, 1] > mixed[0, 0] > mixed[0, 2]  # non-target columns are classes 1, 2, 3
    assert final[0, 0] > final[0, 1] > final[0, 2]


@pytest.mark.parametrize("keep_target,rank_by", FLAGS)
def test_equal_logits(keep_target, rank_by):
    # Every class ties: ranks by class order; the target label is 1 (S_y^2 = its batch mean), the target
    # term log C; the weak term log C too (a uniform prediction against any labels summing to 1).
    s, labels = torch.zeros(3, 5, dtype=torch.float64), torch.tensor([0, 3, 4])
    actual = terms_and_grads(uskd_terms, s, s.clone(), labels, keep_target, rank_by)
    assert_same(actual, terms_and_grads(reference_terms, s, s.clone(), labels, keep_target, rank_by))
    torch.testing.assert_close(actual[0], torch.tensor(math.log(5), dtype=torch.float64))
    torch.testing.assert_close(actual[2], torch.tensor(math.log(5), dtype=torch.float64))
    assert all(torch.isfinite(v).all() for v in actual)


@pytest.mark.parametrize("num_classes", [1, 2])
@pytest.mark.parametrize("keep_target,rank_by", FLAGS)
def test_one_and_two_classes(num_classes, keep_target, rank_by):
    # One class: nothing to learn, every term 0. Two: the non-target softmax has one class, so its term is 0.
    s, w, labels = logits(3, num_classes, 6), logits(3, num_classes, 7), torch.tensor([0, -1, num_classes - 1])
    actual = terms_and_grads(uskd_terms, s, w, labels, keep_target, rank_by)
    assert_same(actual, terms_and_grads(reference_terms, s, w, labels, keep_target, rank_by))
    assert all(torch.isfinite(v).all() for v in actual)
    assert actual[1].abs() < 1e-12 and actual[5].abs().max() < 1e-12  # the non-target term, its gradient
    if num_classes == 1:
        assert all(v.abs().max() < 1e-12 for v in actual)


@pytest.mark.parametrize("keep_target,rank_by", FLAGS)
def test_a_certain_prediction(keep_target, rank_by):
    # S_y = 1 on every row: the target label is 1 and the target term and its gradient vanish; the
    # non-target term stays defined (the softmax over the others does not see the target's logit).
    labels = torch.tensor([4, 0, 2])
    s = logits(3, 5, 8).scatter(1, labels[:, None], 60.0)
    w = logits(3, 5, 9).scatter(1, labels[:, None], 60.0)
    actual = terms_and_grads(uskd_terms, s, w, labels, keep_target, rank_by)
    assert_same(actual, terms_and_grads(reference_terms, s, w, labels, keep_target, rank_by))
    assert actual[0].abs() < 1e-12 and actual[3].abs().max() < 1e-12
    assert actual[1] > 0.5 and all(torch.isfinite(v).all() for v in actual)


def test_float32_and_bfloat16_inputs_agree_with_float64_and_give_float32():
    s, w, labels = logits(6, 5, 10), logits(6, 5, 11), torch.tensor([0, 1, 2, 3, 4, -1])
    expected = uskd_terms(s, w, labels)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = uskd_terms(s.to(dtype), w.to(dtype), labels)
        for term, reference in zip(terms, expected):
            assert term.dtype == torch.float32
            torch.testing.assert_close(term.double(), reference, rtol=tolerance, atol=tolerance)


def test_unlabelled_rows_leave_every_term_and_the_batch_mean():
    s, w, labels = logits(5, 4, 12), logits(5, 4, 13), torch.tensor([1, -1, 0, -1, 3])
    changed_s, changed_w = s.clone(), w.clone()
    changed_s[[1, 3]] = logits(2, 4, 14, scale=9.0)
    changed_w[[1, 3]] = logits(2, 4, 15, scale=9.0)
    before, after = (terms_and_grads(uskd_terms, a, b, labels) for a, b in ((s, w), (changed_s, changed_w)))
    assert_same(after, before)
    assert all(g[[1, 3]].abs().max() == 0 for g in before[3:])


def test_an_unlabelled_batch_gives_zero_with_a_graph():
    s, w = logits(3, 4, 16).requires_grad_(True), logits(3, 4, 17).requires_grad_(True)
    loss = uskd_loss(s, w, torch.full((3,), -1))
    grads = torch.autograd.grad(loss, (s, w))
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_the_weak_term_is_cross_entropy_with_label_smoothing():
    s, w, labels = logits(4, 6, 18), logits(4, 6, 19), torch.tensor([0, 5, 2, 2])
    for eps in (0.0, 0.1, 0.3):
        weak = uskd_terms(s, w, labels, weak_label_smoothing=eps)[2]
        torch.testing.assert_close(weak, F.cross_entropy(w, labels, label_smoothing=eps), rtol=1e-12, atol=1e-12)


def test_uskd_loss_weighs_the_terms_alpha_beta_mu():
    s, w, labels = logits(4, 6, 20), logits(4, 6, 21), torch.tensor([0, 5, 2, -1])
    target, non_target, weak = uskd_terms(s, w, labels)
    torch.testing.assert_close(uskd_loss(s, w, labels, 0.3, 0.7, 0.2), 0.3 * target + 0.7 * non_target + 0.2 * weak)
    torch.testing.assert_close(uskd_loss(s, w, labels), 0.1 * (target + non_target + weak))


@pytest.mark.parametrize("call,message", [
    (lambda s, l: uskd_terms(s, s[:, :3], l), r"logits and weak_logits of the same 2-D shape"),
    (lambda s, l: uskd_terms(s, s, l.float()), r"labels as an integer tensor of shape \[N\]"),
    (lambda s, l: uskd_terms(s, s, l[:2]), r"labels as an integer tensor of shape \[N\] = \(4,\)"),
    (lambda s, l: uskd_terms(s, s, l, rank_by="weak"), r"rank_by must be one of \('weak_and_final', 'final'\)"),
    (lambda s, l: uskd_terms(s, s, l, weak_label_smoothing=1.5), r"weak_label_smoothing must be in \[0, 1\]"),
])
def test_bad_input_is_refused_with_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call(logits(4, 5, 22), torch.tensor([0, 1, 2, 3]))


# ----------------------------------------------------------------- two gloo ranks
SHARD_SIZES = [3, 5]
CLASSES = 6


def make_shards():
    generator = torch.Generator().manual_seed(0)
    s = [2 * torch.randn(size, CLASSES, generator=generator, dtype=torch.float64) for size in SHARD_SIZES]
    w = [2 * torch.randn(size, CLASSES, generator=generator, dtype=torch.float64) for size in SHARD_SIZES]
    # Rank 0 has no labelled row: a per-rank mean (of the terms, or of S_y^2) would weigh rank 1's rows wrongly.
    labels = [torch.full((SHARD_SIZES[0],), -1), torch.tensor([2, -1, 0, 5, 1])]
    return s, w, labels


def every_term_on_one_rank(s, w, labels, flags):
    rank = dist.get_rank()
    return {flag: [v.detach() for v in terms_and_grads(uskd_terms, s[rank], w[rank], labels[rank], *flag)]
            for flag in flags}


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_two_ranks_give_the_global_batch_values_and_gradients(tmp_path):
    s, w, labels = make_shards()
    results = run_on_two_ranks(every_term_on_one_rank, tmp_path, s, w, labels, FLAGS)
    for flag in FLAGS:
        expected = terms_and_grads(uskd_terms, torch.cat(s), torch.cat(w), torch.cat(labels), *flag)
        assert all(term.abs() > 1e-3 for term in expected[:3])  # not a trivially zero case
        start = 0
        for rank, size in enumerate(SHARD_SIZES):
            actual = results[rank][flag]
            for value, reference in zip(actual[:3], expected[:3]):
                torch.testing.assert_close(value.detach(), reference.detach(), rtol=1e-10, atol=1e-12)
            for grad, reference in zip(actual[3:], expected[3:]):
                torch.testing.assert_close(grad, WORLD_SIZE * reference[start:start + size], rtol=1e-10, atol=1e-12)
            start += size
