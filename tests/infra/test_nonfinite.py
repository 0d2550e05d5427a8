"""A NaN/inf loss stops the run with an error that names where and what, or skips the step."""

import lightning as L
import pytest
import torch

from ssl_lightning.methods import SimCLR
from ssl_lightning.runs import step_checkpoint

from helpers.fakes import TINY_BACKBONE, fake_loader


class NaNAtStep(SimCLR):
    """SimCLR whose loss turns NaN at one optimizer step, with two named terms."""

    def __init__(self, bad_step: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.bad_step = bad_step

    def shared_step(self, batch: dict) -> dict:
        out = super().shared_step(batch)
        if self.trainer.global_step == self.bad_step:
            out["loss"] = out["loss"] * float("nan")
        return {**out, "loss/align": out["loss"].detach(), "loss/uniform": torch.tensor(0.5)}


def make(cls: type = NaNAtStep, **kwargs) -> NaNAtStep:
    return cls(**TINY_BACKBONE, proj_hidden_dim=32, proj_dim=16, optimizer="adamw", lr=1e-3,
                     in_chans=1, batch_size=8, **kwargs)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     max_epochs=1, callbacks=[step_checkpoint(tmp_path, every_n_train_steps=1)], **kwargs)


def test_nonfinite_loss_raises_naming_step_method_and_terms(tmp_path):
    model = make()
    with pytest.raises(FloatingPointError) as error:
        trainer(tmp_path).fit(model, fake_loader(batch_size=8, length=32))
    message = str(error.value)
    assert "NaNAtStep: non-finite loss at step 2 (epoch 0)" in message
    assert "loss=nan" in message and "loss/align=nan" in message and "loss/uniform=0.5" in message
    assert "last.ckpt" in message and "on_nonfinite_loss=skip" in message
    kept = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


class WeightsAfterEachStep(L.Callback):
    """Every parameter after each optimizer step, by global step; saved per rank at the end."""

    def __init__(self, directory=None):
        self.directory, self.weights = directory, {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.weights[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_end(self, trainer, pl_module) -> None:
        if self.directory is not None:
            torch.save(self.weights, self.directory / f"rank{trainer.global_rank}.pt")


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_skip_drops_the_step_and_training_goes_on(tmp_path):
    model, weights = make(on_nonfinite_loss="skip"), WeightsAfterEachStep()
    fit = trainer(tmp_path)
    fit.callbacks.append(weights)
    with pytest.warns(UserWarning, match=r"non-finite loss at step 2 .*step skipped"):
        fit.fit(model, fake_loader(batch_size=8, length=40))
    # Lightning still counts the step (and moves the LR schedule on); the weights did not move.
    assert fit.global_step == 5
    assert same(weights.weights[3], weights.weights[2]) and not same(weights.weights[4], weights.weights[3])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite_loss must be 'raise' or 'skip'"):
        make(on_nonfinite_loss="ignore")


class NaNOnRankOne(NaNAtStep):
    """NaN on rank 1 only: without a joint decision rank 0 would wait in DDP's all-reduce forever."""

    def shared_step(self, batch: dict) -> dict:
        out = super().shared_step(batch)
        if self.global_rank == 0:
            out["loss"] = torch.nan_to_num(out["loss"], nan=1.0)
        return out


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_nan_on_one_rank_stops_every_rank(tmp_path):
    model = make(NaNOnRankOne, bad_step=1)
    fit = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    # Rank 0 names rank 1's step and terms: the records are gathered when they are read (here at the end).
    with pytest.raises(Exception, match=r"NaNOnRankOne: non-finite loss at step 1 \(epoch 0\) on rank 1 "
                                        r"\(loss=nan, loss/align=nan, loss/uniform=0.5\)\. Noticed after step 2"):
        fit.fit(model, fake_loader(batch_size=8, length=64))


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_nan_on_one_rank_is_skipped_by_every_rank(tmp_path):
    model = make(NaNOnRankOne, bad_step=1, on_nonfinite_loss="skip")
    fit = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    callbacks=[WeightsAfterEachStep(tmp_path)])
    fit.fit(model, fake_loader(batch_size=8, length=64))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for weights in ranks:
        assert same(weights[2], weights[1])  # step 1 (NaN on rank 1 only) changed nothing on either rank
        assert not same(weights[3], weights[2])
        assert all(torch.isfinite(p).all() for p in weights[3])
    assert same(ranks[0][3], ranks[1][3])


def test_raise_reads_the_loss_on_logger_steps_and_names_the_step_it_went_bad(tmp_path):
    model = make()
    fit = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, max_steps=10, log_every_n_steps=4)
    with pytest.raises(FloatingPointError, match=r"at step 2 \(epoch 0\) \(loss=nan.*Noticed after step 3"):
        fit.fit(model, fake_loader(batch_size=8, length=80))
    assert fit.global_step == 3  # stopped inside step 3, the first step the logger writes (every 4th)


class NaNAtFirstMicroBatch(NaNAtStep):
    """NaN on the first of two accumulated micro-batches of step ``bad_step`` only."""

    def shared_step(self, batch: dict) -> dict:
        out = super().shared_step(batch)
        first_micro_batch = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready % 2 == 1
        if self.trainer.global_step == self.bad_step and not first_micro_batch:
            out = {**out, "loss": torch.nan_to_num(out["loss"], nan=1.0), "loss/align": torch.tensor(1.0)}
        return out


def test_skip_drops_the_whole_step_when_one_accumulated_micro_batch_is_nonfinite(tmp_path):
    model, weights = make(NaNAtFirstMicroBatch, on_nonfinite_loss="skip"), WeightsAfterEachStep()
    fit = trainer(tmp_path, accumulate_grad_batches=2)
    fit.callbacks.append(weights)
    with pytest.warns(UserWarning, match=r"non-finite loss at step 2 .*step skipped"):
        fit.fit(model, fake_loader(batch_size=8, length=80))
    # Step 2's second micro-batch was finite, but the step still changed nothing.
    assert same(weights.weights[3], weights.weights[2]) and not same(weights.weights[4], weights.weights[3])
