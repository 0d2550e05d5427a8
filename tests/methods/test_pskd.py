"""What PSKD promises beyond its family: epoch 0 is plain cross-entropy and stores each image's softmax;
the prediction table across epochs (epoch t's targets use epoch t-1's softmax, recorded here by hand);
an exact resume (table and weights); two ranks with disjoint indices holding one full table, equal to
one process's; the epoch count T; and clear errors for bad arguments, a missing index, an unknown
table size and a run without a length."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
import yaml

from ssl_lightning.cli import SSLCLI
from ssl_lightning.datamodules import Digits
from ssl_lightning.losses import labelled_cross_entropy
from ssl_lightning.methods import Classifier
from ssl_lightning.methods.supervised.pskd import PSKD

from helpers.fakes import TINY_BACKBONE, fake_loader, quick_trainer
from helpers.gloo import WORLD_SIZE, run_on_two_ranks
from helpers.paths import CONFIGS

IMAGES, CLASSES, BATCH = 16, 4, 8


def pskd(**kwargs) -> PSKD:
    arguments = dict(in_chans=1, num_classes=CLASSES, batch_size=BATCH, num_train_images=IMAGES, optimizer="adamw",
                     lr=1e-2, schedule="constant")
    return PSKD(**TINY_BACKBONE, **{**arguments, **kwargs})


def loader(**kwargs):
    return fake_loader(batch_size=BATCH, length=IMAGES, size=16, num_classes=CLASSES, **kwargs)


def reference_loss(logits, labels, previous, alpha):
    """Row by row in float64: - sum_c ((1 - a) [c == y] + a p_c) log softmax(logits)_c, mean over rows."""
    logits, previous = logits.double(), previous.double()
    total = 0.0
    for row, y, p in zip(logits, labels.tolist(), previous):
        log_p = row - torch.logsumexp(row, 0)
        total -= sum(((1 - alpha) * (c == y) + alpha * p[c]) * log_p[c] for c in range(len(row)))
    return total / len(labels)


# ----------------------------------------------------------------- epoch 0
def test_epoch_zero_is_plain_cross_entropy_exactly_and_stores_every_images_softmax():
    torch.manual_seed(0)
    model = pskd()
    model.configure_model()
    baseline = Classifier(**TINY_BACKBONE, in_chans=1, num_classes=CLASSES, batch_size=BATCH)
    baseline.configure_model()
    baseline.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("predictions.")})
    batch = next(iter(loader()))
    batch["label"] = torch.tensor([0, 1, -1, 3, 2, 1, -1, 0])
    out, expected = model.shared_step(batch), baseline.shared_step(batch)
    assert torch.equal(out["loss"], expected["loss"])
    assert torch.equal(out["loss"], labelled_cross_entropy(out["logits"], batch["label"]))
    table = model.predictions.values
    assert torch.equal(table[batch["index"]], out["logits"].detach().softmax(dim=1))  # unlabelled rows too
    assert torch.count_nonzero(table[IMAGES // 2:]) == 0  # the images not in this batch


# ----------------------------------------------------------------- the table across epochs
class RecordSteps(L.Callback):
    """Per training step: the epoch, the indices, labels, logits (from the head) and the loss returned;
    per epoch end: the table."""

    def __init__(self):
        self.steps, self.tables = [], []

    def on_train_start(self, trainer, pl_module):
        pl_module.head.register_forward_hook(lambda module, args, out: self.steps[-1].update(
            logits=out.detach().clone()) if pl_module.training else None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"epoch": trainer.current_epoch, "index": batch["index"].clone(),
                           "label": batch["label"].clone()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["loss"] = outputs["loss"].detach().clone()

    def on_train_epoch_end(self, trainer, pl_module):
        self.tables.append(pl_module.predictions.values.clone())


def test_each_epoch_stores_its_softmax_and_the_next_epoch_trains_on_it():
    torch.manual_seed(0)
    model, record = pskd(), RecordSteps()
    epochs = 3
    quick_trainer(max_epochs=epochs, callbacks=[record], limit_val_batches=0).fit(model, loader())
    assert [step["epoch"] for step in record.steps] == [0, 0, 1, 1, 2, 2]
    for epoch in range(epochs):
        expected = torch.zeros(IMAGES, CLASSES)
        for step in record.steps:
            if step["epoch"] == epoch:
                expected[step["index"]] = step["logits"].softmax(dim=1)
        # after epoch t the table holds each image's epoch-t softmax (all 16 images are visited)
        torch.testing.assert_close(record.tables[epoch], expected, rtol=0, atol=0)
    for step in record.steps:
        epoch, labels = step["epoch"], step["label"]
        if epoch == 0:
            previous, alpha = torch.zeros(BATCH, CLASSES), 0.0  # one-hot targets: a is irrelevant
        else:
            previous, alpha = record.tables[epoch - 1][step["index"]], 0.8 * (epoch + 1) / epochs
        torch.testing.assert_close(step["loss"].double(), reference_loss(step["logits"], labels, previous, alpha),
                                   rtol=1e-6, atol=1e-6)
    # the targets did change: epoch 2's loss is not the plain cross-entropy
    last = record.steps[-1]
    assert abs(float(last["loss"]) - float(reference_loss(last["logits"], last["label"], last["logits"] * 0, 0.0))) > 1e-3


def test_an_image_without_a_stored_prediction_falls_back_to_its_one_hot_label():
    # drop_last can leave an image unvisited in an epoch: a row never written is not a distribution.
    torch.manual_seed(0)
    model = pskd(alpha_T=0.5)
    model.configure_model()
    batch = next(iter(loader()))
    stored = torch.softmax(torch.randn(BATCH, CLASSES), dim=1)
    stored[::2] = 0.0  # rows 0, 2, 4, 6 never written
    model.predictions.values[batch["index"]] = stored
    model._trainer = SimpleNamespace(current_epoch=1, max_epochs=2)
    model.eval()  # a step outside training logs nothing: the trainer stub has no logger settings
    out = model.shared_step(batch)
    previous = torch.where(stored.sum(1, keepdim=True) == 0, torch.eye(CLASSES)[batch["label"]], stored)
    torch.testing.assert_close(out["loss"].double(), reference_loss(out["logits"].detach(), batch["label"], previous,
                                                                    0.5 * 2 / 2), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------- the length T
def test_T_is_max_epochs_or_the_epochs_that_max_steps_spans():
    def trainer(**kwargs):
        return SimpleNamespace(**{"max_epochs": None, "max_steps": -1, "num_training_batches": 4,
                                  "accumulate_grad_batches": 1, **kwargs})

    assert PSKD.total_epochs(trainer(max_epochs=300, max_steps=10)) == 300
    assert PSKD.total_epochs(trainer(max_steps=9)) == 3  # 4 steps an epoch: epochs 0, 1, 2
    assert PSKD.total_epochs(trainer(max_epochs=-1, max_steps=8)) == 2
    assert PSKD.total_epochs(trainer(max_steps=9, accumulate_grad_batches=3)) == 5  # 2 optimizer steps an epoch


def test_a_fit_bounded_by_max_steps_runs_and_logs_alpha_t():
    torch.manual_seed(0)
    model = pskd()
    trainer = quick_trainer(max_steps=5, log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(model, loader())
    # 2 steps an epoch: T = 3 epochs, the last step in epoch 2 with a_2 = 0.8
    assert trainer.global_step == 5 and trainer.callback_metrics["train/alpha_t"].item() == pytest.approx(0.8)


# ----------------------------------------------------------------- resume
def fit(model, max_epochs, path, ckpt_path=None):
    trainer = quick_trainer(max_epochs=max_epochs, limit_val_batches=0)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    trainer.save_checkpoint(path)
    return trainer


def test_a_resumed_fit_gives_the_straight_fits_table_and_weights(tmp_path):
    def fresh():
        torch.manual_seed(1)
        model = pskd()
        model.configure_model()
        return model

    straight = fresh()
    fit(straight, 2, tmp_path / "straight.ckpt")
    fit(fresh(), 1, tmp_path / "half.ckpt")
    resumed = pskd()
    trainer = fit(resumed, 2, tmp_path / "end.ckpt", ckpt_path=tmp_path / "half.ckpt")
    assert trainer.global_step == 4
    assert torch.count_nonzero(straight.predictions.values.sum(1) == 0) == 0  # every image was written
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # loaded without data: the saved num_train_images sizes the table
    loaded = PSKD.load_from_checkpoint(tmp_path / "end.ckpt", weights_only=True)
    assert torch.equal(loaded.predictions.values, straight.predictions.values)


# ----------------------------------------------------------------- two ranks
RANK_INDICES = [torch.tensor([5, 0, 9, 12]), torch.tensor([3, 14, 7, 1])]  # disjoint; 2, 4, 6, ... never seen
RANK_LABELS = [torch.tensor([1, -1, 3, 0]), torch.tensor([2, 2, -1, 1])]


def rank_batch(rank: int, images: torch.Tensor) -> dict:
    return {"views": [images[4 * rank: 4 * rank + 4]], "label": RANK_LABELS[rank], "index": RANK_INDICES[rank]}


def two_epochs(model, batches: list[dict]) -> dict:
    """Epoch 0 on ``batches[0]``, then epoch 1 (T = 2) on ``batches[1]``: the table after each, and epoch
    1's loss with its head-weight gradient. Eval mode: BatchNorm's running statistics make every row's
    logits independent of the batch it is in, so one process and two ranks predict the same."""
    model.eval()
    model._trainer = SimpleNamespace(current_epoch=0, max_epochs=2)
    model.shared_step(batches[0])
    after_epoch_0 = model.predictions.values.clone()
    model._trainer.current_epoch = 1
    loss = model.shared_step(batches[1])["loss"]
    (grad,) = torch.autograd.grad(loss, model.head.weight)
    return {"tables": [after_epoch_0, model.predictions.values.clone()], "loss": loss.detach(), "grad": grad}


def seeded_model() -> PSKD:
    torch.manual_seed(3)
    model = pskd()
    model.configure_model()
    return model


def images() -> torch.Tensor:
    return torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(4))


def on_one_rank() -> dict:
    rank = dist.get_rank()
    # epoch 1 swaps the shards: each rank reads the rows the other rank predicted in epoch 0
    return two_epochs(seeded_model(), [rank_batch(rank, images()), rank_batch(1 - rank, images())])


def concatenated(batches: list[dict]) -> dict:
    return {"views": [torch.cat([b["views"][0] for b in batches])], "label": torch.cat([b["label"] for b in batches]),
            "index": torch.cat([b["index"] for b in batches])}


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_two_ranks_with_disjoint_indices_hold_the_same_full_table_as_one_process(tmp_path):
    results = run_on_two_ranks(on_one_rank, tmp_path)
    one = two_epochs(seeded_model(), [concatenated([rank_batch(0, images()), rank_batch(1, images())]),
                                      concatenated([rank_batch(1, images()), rank_batch(0, images())])])
    seen = torch.cat(RANK_INDICES)
    for epoch in range(2):
        assert torch.count_nonzero(one["tables"][epoch][seen].sum(1) == 0) == 0  # both ranks' rows are there
        for result in results:
            torch.testing.assert_close(result["tables"][epoch], one["tables"][epoch], rtol=1e-6, atol=1e-7)
    assert torch.equal(results[0]["tables"][1], results[1]["tables"][1])
    unseen = torch.ones(IMAGES, dtype=torch.bool)
    unseen[seen] = False
    assert torch.count_nonzero(results[0]["tables"][1][unseen]) == 0
    for result in results:  # the global batch's loss; DDP's mean of the rank gradients is one process's
        torch.testing.assert_close(result["loss"], one["loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sum(r["grad"] for r in results) / WORLD_SIZE, one["grad"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("alpha_T", [-0.1, 1.5])
def test_alpha_T_outside_0_1_is_refused(alpha_T):
    with pytest.raises(ValueError, match=r"PSKD: alpha_T must be in \[0, 1\] .*the paper's 0.8\), got"):
        pskd(alpha_T=alpha_T)


def test_a_batch_without_index_is_refused():
    model = pskd()
    model.configure_model()
    batch = next(iter(loader()))
    del batch["index"]
    with pytest.raises(ValueError, match=r"PSKD needs batch\['index'\].*use an ssl_lightning DataModule"):
        model.shared_step(batch)


def test_an_unknown_number_of_training_images_is_refused():
    with pytest.raises(ValueError, match="PSKD keeps each training image's last prediction.*pass num_train_images="):
        pskd(num_train_images=None).configure_model()


def test_a_table_size_that_disagrees_with_the_datamodule_is_refused():
    model = pskd(in_chans=None, num_classes=None, batch_size=None, num_train_images=1000)
    with pytest.raises(ValueError, match="num_train_images=1000 .* the DataModule has 1437 training images"):
        quick_trainer(max_epochs=1, limit_val_batches=0).fit(model, Digits(batch_size=32, num_workers=0,
                                                                           views="supervised"))


def test_a_run_without_a_length_in_epochs_is_refused_before_training():
    model = pskd()
    trainer = quick_trainer(max_epochs=-1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"needs the run's length T in epochs.*Set trainer.max_epochs"):
        trainer.fit(model, loader())
    assert trainer.global_step == 0


# ----------------------------------------------------------------- the recipe
def test_the_cifar100_recipe_is_the_papers(tmp_path):
    config = yaml.safe_load((CONFIGS / "cifar100" / "pskd.yaml").read_text())
    config["model"]["class_path"] = "ssl_lightning.methods.supervised.pskd.PSKD"  # until it is registered
    path = tmp_path / "pskd.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = SSLCLI(args=["--config", str(path)], run=False)
    hp = cli.model.hparams
    assert isinstance(cli.model, PSKD) and hp.alpha_T == 0.8 and cli.trainer.max_epochs == 300
    assert (hp.lr, hp.weight_decay, hp.optimizer_kwargs, cli.datamodule.batch_size) == (0.2, 5e-4, {"nesterov": True},
                                                                                          128)
    assert not cli.datamodule.drop_last
