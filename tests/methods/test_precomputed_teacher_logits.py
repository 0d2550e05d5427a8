"""``precompute_teacher_logits`` of the distillation students: the rule for deterministic views, the same
training as the online teacher, one teacher pass per training image, the errors, and two DDP ranks."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from ssl_lightning.datamodules import VIEW_PRESETS, Digits, ViewSpec
from ssl_lightning.datamodules.sampling import seeded_rng
from ssl_lightning.datamodules.views import MultiViewTransform, resolve_views, views_are_deterministic
from ssl_lightning.methods.supervised.dkd import DKD
from ssl_lightning.methods.supervised.guided_self_distillation import GuidedSelfDistillation
from ssl_lightning.methods.supervised.kd import KD
from ssl_lightning.methods.supervised.nkd import NKD

from helpers.fakes import fake_loader, quick_trainer, tiny_method
from helpers.host_syncs import HostSyncCounter

DIGITS_TRAIN_IMAGES = 1437


def digits(**kwargs):
    return Digits(**{"batch_size": 32, "num_workers": 0, "views": "none", "seed": 0, **kwargs})


def student(cls=KD, **kwargs):
    torch.manual_seed(0)  # the same student, head included, for every call
    model = tiny_method(cls, in_chans=1, num_classes=10, optimizer="adamw", lr=1e-2, schedule="constant", **kwargs)
    model.configure_model()
    return model


# ----------------------------------------------------------------- the rule
def views_of(specs, seed):
    image = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    with seeded_rng(seed):
        return MultiViewTransform(specs, (0.5,), (0.25,))(image)


@pytest.mark.parametrize("preset", list(VIEW_PRESETS))
def test_a_recipe_is_deterministic_exactly_when_its_views_never_change(preset):
    specs = resolve_views(preset, 8, 1)
    first = views_of(specs, seed=0)
    # Another seed per epoch (SeededSampler's): a random recipe changes some view for some seed.
    changes = any(not torch.equal(a, b) for seed in range(1, 20) for a, b in zip(first, views_of(specs, seed)))
    assert views_are_deterministic(specs) == (not changes) == (preset == "none")


def test_device_views_batch_styles_and_one_augmenting_spec_make_views_random():
    plain = resolve_views([ViewSpec(crop_scale=None, crop_size=6)], 8, 1)
    assert views_are_deterministic(plain)
    assert not views_are_deterministic(plain, on_device=True)
    assert not views_are_deterministic(plain, batch_styles=True)
    assert not views_are_deterministic(resolve_views([ViewSpec(crop_scale=None), ViewSpec(crop_size=6)], 8, 1))


# ----------------------------------------------------------------- the same training, fewer teacher passes
class Record(L.Callback):
    """Per-step losses, the teacher's logits the step used against its online ones, and how many
    images the teacher ran on (a forward hook on the teacher's model, counting rows)."""

    def __init__(self):
        self.losses, self.lookup_errors, self.teacher_rows = [], [], 0

    def on_fit_start(self, trainer, pl_module):  # callbacks run before the module's hook: counts the table's pass
        pl_module.teacher.model.register_forward_hook(lambda module, args, out: self.count(args[0]))

    def count(self, images):
        self.teacher_rows += images.shape[0]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = self.teacher_rows
        used = pl_module.teacher_logits(batch)
        self.lookup_errors.append((used - pl_module.teacher(batch["views"][0])).abs().max().item())
        self.teacher_rows = rows  # that check is not training

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def fit(model, epochs=2, batches=3, **data):
    record = Record()
    quick_trainer(max_epochs=epochs, limit_train_batches=batches, limit_val_batches=0, callbacks=[record]).fit(
        model, digits(**data))
    return record


@pytest.mark.parametrize("cls", [KD, DKD, NKD, GuidedSelfDistillation])
def test_precomputed_logits_train_as_the_online_teacher_with_one_pass_per_training_image(cls):
    online, precomputed = student(cls), student(cls, precompute_teacher_logits=True)
    ran_online, ran_precomputed = fit(online), fit(precomputed)
    assert len(ran_precomputed.losses) == 6
    torch.testing.assert_close(torch.stack(ran_precomputed.losses), torch.stack(ran_online.losses), rtol=1e-6, atol=0)
    for key, value in online.state_dict().items():
        torch.testing.assert_close(precomputed.state_dict()[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert max(ran_precomputed.lookup_errors) < 1e-5  # the rows are the teacher's logits of each step's images
    assert ran_online.teacher_rows == 2 * 3 * 32  # every step's images, every epoch
    assert ran_precomputed.teacher_rows == DIGITS_TRAIN_IMAGES  # each training image once, at the start of fit
    assert precomputed._teacher_logits_table is None  # freed at the end of fit
    assert not any("teacher_logits" in key for key in precomputed.state_dict())  # a cache, never checkpointed


def test_the_lookup_gathers_the_rows_of_the_batch_index():
    model = student(precompute_teacher_logits=True)
    table = torch.arange(40.0).view(10, 4)
    model._teacher_logits_table = table
    batch = next(iter(fake_loader(batch_size=3, num_views=1)))
    batch["index"] = torch.tensor([7, 2, 7])
    counter = HostSyncCounter()
    counter.counting = True
    with counter:
        looked_up = model.teacher_logits(batch)
    assert counter.total() == 0, dict(counter.seen)  # a gather: the host never waits for the device
    assert torch.equal(looked_up, table[[7, 2, 7]])


def test_without_a_teacher_the_option_has_nothing_to_compute():
    model = tiny_method(GuidedSelfDistillation, in_chans=1, num_classes=10, teacher=None, precompute_teacher_logits=True)
    record = []
    quick_trainer(max_steps=2, limit_val_batches=0, callbacks=[Losses(record)]).fit(model, digits())
    assert model.teacher is None and len(record) == 2


class Losses(L.Callback):
    def __init__(self, into):
        self.into = into

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.into.append(outputs["loss"])


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize("data, says", [
    ({"views": "supervised", "view_device": "cpu"}, (r"Digits's views='supervised' are random: at least one view "
                                                     r"augments\. Use --data\.views none .* or leave "
                                                     r"precompute_teacher_logits off")),
    ({"views": "supervised", "view_device": "device"}, (r"views='supervised' are random: at least one view augments; "
                                                        r"they are drawn on the device")),
    ({"batch_styles": True, "batch_styles_area_ratio": 0.1}, r"views='none' are random: batch_styles restyles them"),
])
def test_random_views_stop_the_fit_before_training_and_name_the_fix(data, says):
    model = student(precompute_teacher_logits=True)
    with pytest.raises(ValueError, match=r"KD: precompute_teacher_logits=True needs deterministic training views.*"
                                         + says):
        quick_trainer(max_steps=1).fit(model, digits(**data))


def test_dataloaders_without_a_view_datamodule_are_refused():
    model = student(precompute_teacher_logits=True)
    with pytest.raises(TypeError, match=r"KD: precompute_teacher_logits=True needs a ViewDataModule.*got dataloaders "
                                         r"without a DataModule\. .*views='none', or set precompute_teacher_logits=False"):
        quick_trainer(max_steps=1).fit(model, fake_loader(num_views=1))


class WithoutIndex(Digits):
    def on_after_batch_transfer(self, batch, dataloader_idx):
        return {key: value for key, value in super().on_after_batch_transfer(batch, dataloader_idx).items()
                if key != "index"}


def test_a_batch_without_index_is_refused():
    model = student(precompute_teacher_logits=True)
    with pytest.raises(ValueError, match=r"KD: precompute_teacher_logits=True looks the teacher's logits up by the "
                                         r"batch's 'index'.*has only \['label', 'views'\]"):
        quick_trainer(max_steps=1, limit_val_batches=0).fit(model, WithoutIndex(batch_size=32, num_workers=0, views="none"))


class ShrinksAfterTheFirstEpoch(Digits):
    """Its training set loses images when the dataloaders reload for the second epoch."""

    loads = 0

    def train_dataloader(self):
        loader = super().train_dataloader()
        self.loads += 1
        return loader if self.loads == 1 else DataLoader(Subset(loader.dataset, range(1000)), batch_size=32)


def test_a_training_set_of_another_length_than_the_table_stops():
    model = student(precompute_teacher_logits=True)
    trainer = quick_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0,
                            reload_dataloaders_every_n_epochs=1)
    with pytest.raises(ValueError, match=rf"KD: the precomputed teacher logits cover {DIGITS_TRAIN_IMAGES} training "
                                         r"images, but the training set now has 1000\..*precompute_teacher_logits=False"):
        trainer.fit(model, ShrinksAfterTheFirstEpoch(batch_size=32, num_workers=0, views="none"))
    assert trainer.current_epoch == 1  # the first epoch trained from the table


def test_the_lookup_outside_a_fit_says_where_the_table_comes_from():
    model = student(precompute_teacher_logits=True)
    with pytest.raises(RuntimeError, match=r"KD: precompute_teacher_logits=True, but the table .* is not computed: "
                                           r"Trainer\.fit computes it"):
        model.shared_step(next(iter(fake_loader(num_views=1))))


# ----------------------------------------------------------------- two DDP ranks
class SaveLookups(L.Callback):
    """Each rank writes its batches' indices, the rows it looked up, the teacher's online logits of its
    images and how many images its teacher ran on before training (ddp_spawn returns nothing else)."""

    def __init__(self, directory):
        self.directory, self.rows, self.seen = directory, 0, []

    def on_fit_start(self, trainer, pl_module):
        pl_module.teacher.model.register_forward_hook(lambda module, args, out: self.add(args[0].shape[0]))

    def add(self, rows):
        self.rows += rows

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.seen:
            self.seen.append(self.rows)
        self.seen.append({"index": batch["index"], "looked_up": pl_module.teacher_logits(batch),
                          "online": pl_module.teacher(batch["views"][0])})

    def on_train_end(self, trainer, pl_module):
        torch.save(self.seen, self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_each_of_two_ranks_computes_half_the_table_and_looks_up_its_own_images(tmp_path):
    model = student(precompute_teacher_logits=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[SaveLookups(tmp_path)])
    trainer.fit(model, digits(batch_size=16))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [seen[0] for seen in ranks] == [DIGITS_TRAIN_IMAGES // 2, DIGITS_TRAIN_IMAGES - DIGITS_TRAIN_IMAGES // 2]
    indices = [torch.cat([step["index"] for step in seen[1:]]) for seen in ranks]
    assert not set(indices[0].tolist()) & set(indices[1].tolist())  # each rank its own images
    half = DIGITS_TRAIN_IMAGES // 2  # and rows of the other rank's share among them
    assert (indices[0] >= half).any() and (indices[1] < half).any()
    assert all(len(seen) == 4 for seen in ranks)
    for seen in ranks:
        for step in seen[1:]:  # rows of the other rank's share are all-gathered ones
            torch.testing.assert_close(step["looked_up"], step["online"], rtol=1e-5, atol=1e-6)
