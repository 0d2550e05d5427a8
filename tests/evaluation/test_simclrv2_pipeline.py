"""SimCLRv2's semi-supervised pipeline: SimCLR's 3-layer projector, FineTune from its first block on
the labelled subset (SimCLR's LARS), the FineTune checkpoint as a KD teacher, and the three recipes
chained through the CLI (each stage reading the previous stage's checkpoint)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.cli import main
from ssl_lightning.components.classifier_files import from_checkpoint
from ssl_lightning.datamodules import Digits
from ssl_lightning.evaluation import FineTune
from ssl_lightning.evaluation.finetune import lars_groups_as_simclr
from ssl_lightning.methods import KD, SimCLR
from ssl_lightning.optim import create_optimizer, layer_decay_param_groups

from helpers.fakes import TINY_BACKBONE, quick_trainer
from helpers.paths import CONFIGS

HIDDEN, OUT = 32, 16  # the tiny projector's widths
PAPER_FINETUNE = {"optimizer": "lars", "lr": 0.08, "lr_scaling": "sqrt", "weight_decay": 0.0, "warmup_epochs": 0,
                  "label_smoothing": 0.0}


@pytest.fixture(scope="module")
def v2_checkpoint(tmp_path_factory):
    """A 1-step tiny SimCLR checkpoint with SimCLRv2's 3-layer projector (two hidden blocks)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SimCLR(**TINY_BACKBONE, proj_hidden_dim=HIDDEN, proj_dim=OUT, proj_layers=3, optimizer="adamw")
        trainer = quick_trainer(max_steps=1, limit_val_batches=0)
        trainer.fit(model, Digits(batch_size=32, num_workers=0, seed=0))
    path = tmp_path_factory.mktemp("simclrv2") / "pretrained.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def finetuned(v2_checkpoint, tmp_path_factory):
    """FineTune with projector_layers=1, 2 steps of the paper's optimizer on 10% of Digits' labels (the
    labelled images alone): the fitted module and its checkpoint."""
    run = tmp_path_factory.mktemp("finetuned")  # labelled_subset.json goes there, not into the working directory
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = FineTune(pretrained=str(v2_checkpoint), projector_layers=1, **PAPER_FINETUNE)
        trainer = quick_trainer(max_steps=2, limit_val_batches=0, default_root_dir=run)
        trainer.fit(model, Digits(batch_size=32, num_workers=0, views="supervised", label_fraction=0.1,
                                  unlabelled="drop", seed=0))
    path = run / "finetune.ckpt"
    trainer.save_checkpoint(path)
    return model, path, trainer


def pretrained_state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


# ---------------------------------------------------------------- SimCLR's projector depth


def test_simclr_builds_v1s_2_layer_projector_by_default_and_v2s_3_layer_one_on_request():
    def linears(**kwargs):
        model = SimCLR(**TINY_BACKBONE, proj_hidden_dim=HIDDEN, proj_dim=OUT, in_chans=1, **kwargs)
        model.configure_model()
        return [(layer.in_features, layer.out_features) for layer in model.projector if isinstance(layer, nn.Linear)]

    assert linears() == [(64, HIDDEN), (HIDDEN, OUT)]
    assert linears(proj_layers=3) == [(64, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, OUT)]
    with pytest.raises(ValueError, match=r"proj_layers must be at least 1 \(2: SimCLR, 3: SimCLRv2\), got 0"):
        SimCLR(proj_layers=0)


# ---------------------------------------------------------------- fine-tuning from the first projector block


def test_finetune_keeps_the_first_projector_block_with_its_weights_and_statistics(v2_checkpoint):
    model = FineTune(pretrained=str(v2_checkpoint), projector_layers=1, in_chans=1, num_classes=10)
    model.configure_model()
    state = pretrained_state(v2_checkpoint)
    assert [type(layer) for layer in model.projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert model.head.in_features == HIDDEN and model.projector.training
    for name, value in model.projector.state_dict().items():
        assert torch.equal(value, state[f"projector.{name}"]), name

    # In eval mode the head reads the pretrained network's first projector block, written out here.
    model.eval()
    images = torch.randn(4, 1, 32, 32)
    feats = model.backbone(images)
    block = F.relu(F.batch_norm(F.linear(feats, state["projector.0.weight"], state["projector.0.bias"]),
                                state["projector.1.running_mean"], state["projector.1.running_var"],
                                state["projector.1.weight"], state["projector.1.bias"], eps=1e-5))
    torch.testing.assert_close(model(images), model.head(block))


def test_finetune_trains_the_kept_block_with_the_backbone_on_the_labelled_subset_only(v2_checkpoint, finetuned):
    model, _, trainer = finetuned
    state = pretrained_state(v2_checkpoint)
    # Trained, BatchNorm statistics too; the Linear's bias has no gradient (the BatchNorm after it
    # subtracts the batch mean) and the step counter is not a weight.
    for name, value in model.projector.state_dict().items():
        if name not in ("0.bias", "1.num_batches_tracked"):
            assert not torch.equal(value, state[f"projector.{name}"]), name
    assert not torch.equal(model.backbone.conv1.weight, state["backbone.conv1.weight"])
    train = trainer.datamodule._datasets["train"]
    assert len(train) == 142 and bool((torch.as_tensor(train.source.labels) >= 0).all())  # 10% of 1,437, stratified
    assert json.loads((Path(trainer.default_root_dir) / "labelled_subset.json").read_text())["num_labelled"] == 142


def test_zero_projector_layers_is_the_plain_fine_tuning(v2_checkpoint):
    model = FineTune(pretrained=str(v2_checkpoint), in_chans=1, num_classes=10)
    model.configure_model()
    assert len(model.projector) == 0 and model.head.in_features == 64
    assert not any(key.startswith("projector.") for key in model.state_dict())  # older checkpoints still load


def edited_checkpoint(source, tmp_path, edit) -> str:
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["state_dict"] = edit(checkpoint["state_dict"])
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def test_a_checkpoint_without_enough_projector_blocks_is_refused_with_what_it_has(v2_checkpoint, tmp_path):
    def build(path, layers):
        FineTune(pretrained=str(path), projector_layers=layers, in_chans=1, num_classes=10).configure_model()

    with pytest.raises(ValueError, match=r"has 2 hidden Linear-BN-ReLU block\(s\) in its projector \(a 3-layer "
                                         r"MLPHead\), but 3 projector block\(s\) were asked for. Keep at most 2"):
        build(v2_checkpoint, 3)
    without = edited_checkpoint(v2_checkpoint, tmp_path, lambda s: {k: v for k, v in s.items()
                                                                    if not k.startswith("projector.")})
    with pytest.raises(ValueError, match=r"has no 'projector.' module \(its modules: backbone, probe\), but 1 "
                                         r"projector block\(s\) were asked for.*SimCLR proj_layers=3"):
        build(without, 1)
    other = edited_checkpoint(v2_checkpoint, tmp_path, lambda s: {k.replace("projector.", "projector.mlp."): v
                                                                  for k, v in s.items()})
    with pytest.raises(ValueError, match="has a 'projector' that is not an MLPHead with hidden blocks"):
        build(other, 1)
    with pytest.raises(ValueError, match=r"projector_layers must be >= 0"):
        FineTune(pretrained=str(v2_checkpoint), projector_layers=-1)


def test_lars_groups_adapt_every_weight_but_biases_norms_and_the_head_even_without_weight_decay():
    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), nn.Linear(3, 2)
    groups = lars_groups_as_simclr(layer_decay_param_groups(body, head, 0.0, None), head)
    assert [(g["name"], g.get("always_adapt"), len(g["params"])) for g in groups] == [
        ("weights", True, 1), ("weights_head", False, 1), ("no_decay", None, 4)]

    lr, eta = 0.5, 1e-3
    optimizer = create_optimizer("lars", groups, lr=lr, weight_decay=0.0, momentum=0.0, trust_coeff=eta)
    params = [body[0].weight, head.weight, body[0].bias, body[1].weight]
    before = [param.detach().double().clone() for param in params]
    for param in params:
        param.grad = torch.randn_like(param)
    grads = [param.grad.double() for param in params]
    optimizer.step()
    # SimCLR's LARS (tf2/lars_optimizer.py, classic momentum, first step): w - lr * eta * |w| / |g| * g for the
    # adapted weights, w - lr * g for the head, biases and norms.
    trust = eta * before[0].norm() / grads[0].norm()
    expected = [before[0] - lr * trust * grads[0]] + [w - lr * g for w, g in zip(before[1:], grads[1:])]
    for param, want in zip(params, expected):
        torch.testing.assert_close(param.detach().double(), want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the FineTune checkpoint as a KD teacher


def test_a_finetune_checkpoint_is_a_kd_teacher_with_the_finetuned_logits(finetuned):
    model, path, _ = finetuned
    student = KD(**TINY_BACKBONE, teacher_ckpt=str(path), temperature=1.0, ce_weight=0.0, kd_weight=1.0)
    data = Digits(batch_size=32, num_workers=0, views="supervised")
    with torch.no_grad():
        student.teacher.load(num_classes=10, in_chans=1, datamodule=data)  # same normalisation: no warning
        images = torch.randn(6, 1, 32, 32)
        torch.testing.assert_close(student.teacher(images), model.eval()(images), rtol=0, atol=0)
    loaded = from_checkpoint("KD", str(path))
    assert loaded.num_classes == 10 and loaded.in_chans == 1 and loaded.inputs["mean"] == list(data.mean)


def test_a_self_supervised_checkpoint_is_still_refused_as_a_teacher(v2_checkpoint):
    with pytest.raises(ValueError, match="is not a classifier checkpoint: it has no classifier head"):
        from_checkpoint("KD", str(v2_checkpoint))


# ---------------------------------------------------------------- the three recipes, chained


def test_the_recipes_chain_pretrain_finetune_distill_each_reading_the_previous_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes' run directories (runs/<run_name>) and paths are relative
    tiny = ["--data", "Digits", "--data.init_args.batch_size", "16", "--data.init_args.num_workers", "0",
            "--data.init_args.image_size", "16",
            "--trainer.accelerator", "cpu", "--trainer.precision", "32", "--trainer.callbacks", "[]",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0", "--trainer.max_steps", "1"]
    small_backbone = ["--model.init_args.backbone_kwargs", json.dumps(TINY_BACKBONE["backbone_kwargs"])]

    def stage(name, *extra):
        return main(["fit", "--config", str(CONFIGS / "cifar10" / f"simclrv2_{name}.yaml"), *tiny, *extra])

    pretrain = stage("pretrain", *small_backbone, "--model.init_args.proj_hidden_dim", str(HIDDEN),
                     "--model.init_args.proj_dim", str(OUT))
    assert sum(isinstance(layer, nn.Linear) for layer in pretrain.model.projector) == 3
    pretrained = pretrained_state(tmp_path / "runs/cifar10-simclrv2-pretrain/checkpoints/last.ckpt")

    finetune = stage("finetune")
    assert finetune.model.hparams.pretrained == "runs/cifar10-simclrv2-pretrain/checkpoints/last.ckpt"
    labelled = json.loads(next((tmp_path / "runs/cifar10-simclrv2-finetune").rglob("labelled_subset.json")).read_text())
    assert len(finetune.datamodule._datasets["train"]) == labelled["num_labelled"] == 142
    tuned = pretrained_state(tmp_path / "runs/cifar10-simclrv2-finetune/checkpoints/last.ckpt")
    for key in ("backbone.conv1.weight", "projector.0.weight"):  # read from stage 1, then trained a little
        change = (tuned[key] - pretrained[key]).norm() / pretrained[key].norm()
        assert 0 < change < 0.01, (key, change)

    distill = stage("distill", *small_backbone)
    assert distill.model.hparams.teacher_ckpt == "runs/cifar10-simclrv2-finetune/checkpoints/last.ckpt"
    assert distill.model.hparams.ce_weight == 0.0 and distill.model.hparams.temperature == 1.0
    teacher = distill.model.teacher.model.state_dict()
    assert teacher.keys() == {key for key in tuned if key.split(".")[0] in ("backbone", "projector", "head")}
    for key, value in teacher.items():
        assert torch.equal(value, tuned[key]), key
    assert (tmp_path / "runs/cifar10-simclrv2-distill/checkpoints/last.ckpt").is_file()
