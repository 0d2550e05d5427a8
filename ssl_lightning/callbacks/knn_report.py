"""End-of-training kNN report: the trained backbone next to two baselines."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ssl_lightning.metrics.knn import knn_accuracy
from ssl_lightning.strategies import unsharded_copy


class KNNReport(L.Callback):
    """After ``fit``, prints kNN top-1 of (1) the trained backbone, (2) the same architecture at
    random initialisation (seed ``init_seed``) and (3) raw pixels, so a user sees at once what
    training bought.

    Protocol: weighted kNN (k, temperature, cosine) on backbone ``feats`` in eval mode, bank =
    the un-augmented training split, queries = the validation split. Runs on rank zero only, with
    the DataModule's own (non-distributed) loaders; under FSDP every rank first helps gather the
    sharded backbone. The numbers are kept in ``self.results``.

    A method may add rows beside the trained backbone: ``knn_report_encoders() -> {name: module}``
    (Random Teachers: its frozen teacher's backbone), each of the backbone's architecture.

    ``baselines=False`` leaves out rows (2) and (3): a benchmark that trains many methods with one
    backbone on one dataset measures them once, not once per method.
    """

    def __init__(self, k: int = 20, temperature: float = 0.1, init_seed: int = 0, baselines: bool = True):
        self.k = k
        self.temperature = temperature
        self.init_seed = init_seed
        self.baselines = baselines
        self.results: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        request = getattr(trainer.datamodule, "request_knn_bank", None)
        if request is None:
            raise ValueError("KNNReport needs an ssl_lightning DataModule (one with request_knn_bank()).")
        request()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank helps gather a sharded (FSDP) backbone; rank zero alone encodes and reports.
        trained_backbone = unsharded_copy(trainer, pl_module.backbone, pl_module.build_fresh_backbone)
        method_rows = getattr(pl_module, "knn_report_encoders", dict)()  # {} unless the method adds rows
        method_encoders = {name: unsharded_copy(trainer, module, pl_module.build_fresh_backbone)
                           for name, module in method_rows.items()}
        if not trainer.is_global_zero:
            return
        query_loader, bank_loader = trainer.datamodule.val_dataloader()
        encoders = {"trained backbone": trained_backbone, **method_encoders}
        if self.baselines:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.init_seed)
                encoders[f"random init (seed {self.init_seed})"] = pl_module.build_fresh_backbone().to(pl_module.device)
            encoders["raw pixels"] = torch.nn.Flatten()
        lines = [f"kNN top-1 (k={self.k}, T={self.temperature}, cosine; bank = train split, queries = val split):"]
        for name, encoder in encoders.items():
            bank, bank_labels = _encode(encoder, bank_loader, pl_module.device)
            queries, query_labels = _encode(encoder, query_loader, pl_module.device)
            top1 = knn_accuracy(queries, query_labels, bank, bank_labels, self.k, self.temperature)["top1"]
            self.results[name] = top1
            lines.append(f"  {name:<24} {top1:6.2f}%")
        rank_zero_info("\n".join(lines))


@torch.no_grad()
def _encode(encoder: torch.nn.Module, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            feats.append(encoder(batch["views"][0].to(device)).float())
            labels.append(batch["label"].to(device))
    finally:
        encoder.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels)
    labelled = labels >= 0
    return feats[labelled], labels[labelled]
