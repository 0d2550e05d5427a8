
import numpy as np
import pytest
import torch

from ssl_lightning.callbacks import EmbeddingWriter
from ssl_lightning.cli import main
from ssl_lightning.datamodules import Digits
from ssl_lightning.datamodules.digits import load_digit_splits
from ssl_lightning.methods import SimCLR

from helpers.fakes import SMALL_HEADS, TINY_BACKBONE, quick_trainer
from helpers.paths import CONFIGS


def test_predict_cli_writes_embeddings_of_the_quickstart_checkpoint(tmp_path):
    recipe = ["--config", str(CONFIGS / "quickstart.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    main(["fit", *recipe, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.callbacks=[]"])
    (ckpt,) = tmp_path.rglob("*.ckpt")
    main(["predict", *recipe, "--config", str(CONFIGS / "predict" / "embeddings.yaml"), "--ckpt_path", str(ckpt)])
    out = np.load(tmp_path / "embeddings.npz")
    assert str(out["split"]) == "val"
    assert out["feats"].shape == (360, 256) and out["embeds"].shape == (360, 128)
    np.testing.assert_array_equal(out["index"], np.arange(360))
    np.testing.assert_array_equal(out["label"], load_digit_splits()["val"].labels.numpy())
    assert np.isfinite(out["feats"]).all()


def test_writer_on_the_train_split_matches_the_backbone(tmp_path):
    model = SimCLR(**TINY_BACKBONE, **SMALL_HEADS)
    datamodule = Digits(batch_size=256, num_workers=0)
    trainer = quick_trainer(callbacks=[EmbeddingWriter(str(tmp_path / "train.npz"), split="train")])
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    out = np.load(tmp_path / "train.npz")
    assert str(out["split"]) == "train" and out["feats"].shape == (1437, 64)
    first = next(iter(datamodule.predict_dataloader()))
    model.eval()
    with torch.no_grad():
        expected = model.backbone(first["views"][0][:4])
    np.testing.assert_allclose(out["feats"][:4], expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out["label"][:4], first["label"][:4].numpy())


def test_writer_rejects_an_unknown_split():
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        EmbeddingWriter(split="test")
