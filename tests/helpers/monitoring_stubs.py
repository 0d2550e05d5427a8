"""A stub LightningModule whose validation embeddings are fixed rows, for the monitoring tests."""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class FixedEmbeddings(Dataset):
    """Row i is a fixed random vector; ``collapsed`` makes every row the same."""

    def __init__(self, length: int, dim: int = 32, collapsed: bool = False):
        self.rows = torch.ones(length, dim) if collapsed else torch.randn(
            length, dim, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.rows[i], "index": i}


class StubMethod(L.LightningModule):
    """validation_step returns its input rows as both feats and embeds."""

    def __init__(self, data: Dataset):
        super().__init__()
        self.data = data
        self.layer = nn.Linear(data.rows.shape[1], 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["x"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return {"feats": batch["x"], "embeds": batch["x"], "label": batch["index"] % 3, "index": batch["index"]}

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=8)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)
