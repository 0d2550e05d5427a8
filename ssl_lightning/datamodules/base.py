"""ViewDataModule: the shared DataModule behind every dataset (views, batch dict, loaders, kNN bank)."""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from ssl_lightning.datamodules.device_batches import (
    FixedSizeImages,
    ImagesInMemory,
    IndexItems,
    make_views_on_device,
    resolve_view_device,
)
from ssl_lightning.datamodules.device_views import DeviceViews
from ssl_lightning.datamodules.label_fraction import (
    LabelledImages,
    PartiallyLabelled,
    labelled_subset,
    write_labelled_subset,
)
from ssl_lightning.datamodules.sampling import (
    ResumableDataLoader,
    SeededSampler,
    seeded_rng,
    split_seeded_item,
)
from ssl_lightning.datamodules.sources import ImageSource, check_labels
from ssl_lightning.datamodules.style_standardization import (
    DEFAULT_MIX,
    check_style_parameters,
    standardize_batch_styles,
)
from ssl_lightning.datamodules.views import (
    MultiViewTransform,
    ViewSpec,
    check_preset_name,
    resolve_views,
)

Split = Literal["train", "val", "bank"]

#: ``dataloader_idx`` of the validation split and of the kNN bank once ``request_knn_bank()`` was called
QUERIES, BANK = 0, 1

#: Offsets a batch's seed for the choice of its style images, so it draws apart from its views
STYLE_SEED_OFFSET = 0x5717E


class ViewDataset(Dataset):
    """Wraps a raw image source into the batch-dict items: {"views": [...], "label": int, "index": int}."""

    def __init__(self, source: ImageSource, transform: MultiViewTransform) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, seed = split_seeded_item(item)  # training items carry their augmentation seed
        image, label = self.source[index]
        with seeded_rng(seed):
            views = self.transform(image)
        return {"views": views, "label": label, "index": index}


class ViewDataModule(L.LightningDataModule, ABC):
    """Base DataModule: yields batches {"views": [BxCxHxW, ...], "label": B, "index": B}.

    Training batches carry the recipe's views (global crops first, shuffled, `drop_last`). Their
    order and augmentations are functions of (seed, epoch, index) (see `sampling.py`), so a run
    resumed from a mid-epoch checkpoint continues with exactly the batches it would have seen;
    validation (and `test`) batches carry one un-augmented view. After `request_knn_bank()` (the kNN callback
    calls it in its setup), `val_dataloader()` returns `[val, bank]`, the bank being the training
    split through the same un-augmented view, in order. Properties are readable right after
    `__init__`, before `setup`.

    Subclasses provide `num_classes`, `in_chans`, `native_image_size`, `mean`, `std` and
    `_load_images(split)` for "train", "val" and "bank".

    Args:
        batch_size: images per batch and per process.
        num_workers: DataLoader worker processes.
        views: a preset name (see VIEW_PRESETS) or a list of ViewSpec.
        image_size: side of the global views and of the validation view; None = the dataset's own.
        drop_last: drop the last incomplete training batch.
        pin_memory: batches in page-locked host memory, so that their copy to a GPU runs
            asynchronously instead of holding up the host; None (default): on when the trainer
            runs on a CUDA device, off otherwise.
        persistent_workers: keep workers alive between epochs (only applies when num_workers > 0).
        view_device: where training views are drawn: "cpu" (per image, torchvision, in the workers),
            "device" (the loader yields uint8 `image` at image_size and `on_after_batch_transfer`
            draws the views batched on the accelerator, or on the CPU without one), or "auto"
            (default): "device" when the recipe augments and the images are stored at one size,
            the faster path on accelerators and at every measured size on the CPU (up to 224 px;
            beyond it "cpu"), else "cpu". See docs/device_views.md.
        in_memory: keep the whole uint8 training split on the device (device-side views only):
            training batches carry indices, no decoding and no DataLoader workers during training.
            For small-image datasets (CIFAR-10 is 150 MB).
        compile_views: draw device-side views through ``torch.compile`` (device-side views only):
            the eager path launches hundreds of small kernels per batch, which the compiler fuses.
            Meant for accelerators; the first batch of each shape compiles. See docs/device_views.md.
        seed: seed of the training order and augmentations; None: the run's `seed_everything` seed,
            or a fresh random one without it. Checkpoints store it, so a resumed run keeps its own.
        batch_styles: Batch Styles Standardization (Scalbert et al., ICLR 2024; see
            `style_standardization.py` and docs/batch_styles.md): after the views are made, each view
            index of a training batch gets the low-frequency Fourier amplitude of one of its images,
            drawn at random, while every image keeps its phase. Any method can switch it on; it runs
            in `on_after_batch_transfer` on both view paths, on [0, 1] pixels (the views are
            un-normalised, standardised and normalised again). Validation and kNN-bank batches are
            left alone.
        batch_styles_area_ratio: fraction of the spectrum whose amplitude is shared, a number in
            (0, 1] or a range (low, high) drawn per view index and batch; required with
            ``batch_styles`` (the paper's value is not verified here, docs/batch_styles.md).
        batch_styles_mix: weight of the shared amplitude inside that region; 1 replaces it (BSS).
        label_fraction: keep the labels of only this fraction of the training images, the same share
            of every class (semi-supervised fine-tuning: SimCLRv2's 0.01 and 0.1); the others read
            as unlabelled (-1), which the losses mask. None keeps every label. The subset depends
            on ``label_fraction_seed`` alone (the same on every rank and rerun) and is written to
            ``labelled_subset.json`` in the run directory. The kNN bank, a monitor, keeps every label.
        label_fraction_seed: seed of the labelled subset.
        unlabelled: what the training split does with its unlabelled images (those outside
            ``label_fraction``'s subset, or stored with label -1): "keep" (default) them in the
            batches, where the losses mask them, or "drop" them, so training sees the labelled images
            alone (SimCLRv2's fine-tuning on 1 % or 10 % of the labels). The subset is still written
            to the run directory; validation and the kNN bank are untouched.
    """

    def __init__(
        self,
        batch_size: int = 256,
        num_workers: int = 2,
        views: str | list[ViewSpec] = "simclr",
        image_size: int | None = None,
        drop_last: bool = True,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        view_device: Literal["auto", "cpu", "device"] = "auto",
        in_memory: bool = False,
        compile_views: bool = False,
        seed: int | None = None,
        batch_styles: bool = False,
        batch_styles_area_ratio: float | tuple[float, float] | None = None,
        batch_styles_mix: float = DEFAULT_MIX,
        label_fraction: float | None = None,
        label_fraction_seed: int = 0,
        unlabelled: Literal["keep", "drop"] = "keep",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be positive or None, got {image_size}")
        if isinstance(views, str):
            check_preset_name(views)
        if view_device not in ("auto", "cpu", "device"):
            raise ValueError(f"view_device must be 'auto', 'cpu' or 'device', got {view_device!r}")
        for option, wanted in (("in_memory", in_memory), ("compile_views", compile_views)):
            if wanted and view_device == "cpu":
                raise ValueError(f"{option}=True needs device-side views, but view_device='cpu' draws them per image "
                                 f"in the DataLoader workers: set view_device to 'device' or 'auto', or {option}=False")
        if label_fraction is not None and not 0.0 < label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1] (e.g. 0.1 for 10% of the labels) or None, got {label_fraction}")
        if unlabelled not in ("keep", "drop"):
            raise ValueError(f"unlabelled must be 'keep' (masked in the losses) or 'drop' (train on the labelled "
                             f"images alone), got {unlabelled!r}")
        if batch_styles:
            check_style_parameters(batch_styles_area_ratio, batch_styles_mix, prefix="batch_styles_")
        self._batch_size = batch_size
        self.num_workers = num_workers
        self.views = views
        self._image_size = image_size
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.view_device = view_device
        self.in_memory = in_memory
        self.compile_views = compile_views
        self.views_on_device = False  # view_device resolved in setup("fit")
        self._images_in_memory: ImagesInMemory | None = None
        self.seed = seed
        self.batch_styles = batch_styles
        self.batch_styles_area_ratio = batch_styles_area_ratio
        self.batch_styles_mix = batch_styles_mix
        self.label_fraction = label_fraction
        self.label_fraction_seed = label_fraction_seed
        self.unlabelled = unlabelled
        self._pixel_stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._knn_bank_requested = False
        self._datasets: dict[Split, ViewDataset | None] = {}
        self._train_loader: ResumableDataLoader | None = None
        self._resume_position: dict | None = None

    # What a subclass declares about its data.

    @property
    @abstractmethod
    def num_classes(self) -> int | None: ...

    @property
    @abstractmethod
    def in_chans(self) -> int: ...

    @property
    @abstractmethod
    def native_image_size(self) -> int:
        """The size images are stored at; image_size defaults to it."""

    @property
    @abstractmethod
    def mean(self) -> tuple[float, ...]: ...

    @property
    @abstractmethod
    def std(self) -> tuple[float, ...]: ...

    @abstractmethod
    def _load_images(self, split: Split) -> ImageSource | None:
        """Raw images of a split; None only for an optional validation split that is absent."""

    #: whether every stored image has one size (so batching before the random crop loses nothing);
    #: ``view_device: auto`` uses batched views only then
    stores_one_image_size: bool = True

    #: the split ``predict_dataloader`` serves; the EmbeddingWriter callback sets it
    predict_split: Literal["train", "val"] = "val"

    # What methods and callbacks read.

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def image_size(self) -> int:
        return self._image_size or self.native_image_size

    @property
    def view_specs(self) -> list[ViewSpec]:
        """The training recipe with every crop size resolved."""
        return resolve_views(self.views, self.image_size, self.in_chans)

    @property
    def num_views(self) -> int:
        return sum(spec.num for spec in self.view_specs)

    @property
    def num_train_images(self) -> int | None:
        """Images in the training split, once ``setup("fit")`` has loaded it (None before): the
        size of per-sample memories (``components.memory.IndexedMemory``)."""
        train = self._datasets.get("train")
        return None if train is None else len(train)

    @property
    def train_wait_seconds(self) -> float | None:
        """Host seconds training has waited for batches from the current training loader (None
        before there is one); ``callbacks.InputWait`` turns it into a share of the training time."""
        return None if self._train_loader is None else self._train_loader.wait_seconds

    def request_knn_bank(self) -> None:
        """Make val_dataloader() also return the un-augmented training split (dataloader_idx 1)."""
        self._knn_bank_requested = True

    def raw_images(self, split: Split) -> ImageSource:
        """A split's stored uint8 images and labels, checked, before any view (corruption streams
        read the held-out split, "val", to corrupt it themselves)."""
        return self._checked_images(split)

    # Lightning hooks.

    def setup(self, stage: str) -> None:
        if stage == "fit":
            train = self._checked_images("train")
            if self.label_fraction is not None:
                train = self._keep_label_fraction(train)
            if self.unlabelled == "drop":
                train = LabelledImages(train, f"{type(self).__name__} (unlabelled='drop')")
            self._check_batch_fits(len(train))
            self.views_on_device = self._resolve_view_device() == "device"
            if self.views_on_device:
                self.device_views = DeviceViews(self.view_specs, self.mean, self.std, compile=self.compile_views)
                if self.compile_views and self._device_type() == "cpu":
                    rank_zero_warn(
                        "compile_views=True on the CPU: compiled views measured 1.4-2x slower there than the eager "
                        "path, which indexes the chosen samples instead of blending (docs/device_views.md); "
                        "compile_views is meant for accelerators"
                    )
                if self.in_memory:
                    self._images_in_memory = ImagesInMemory(train, self.image_size, self.num_workers)
                    self._datasets["train"] = IndexItems(self._images_in_memory)
                else:
                    self._datasets["train"] = FixedSizeImages(train, self.image_size)
            else:
                self._datasets["train"] = ViewDataset(train, MultiViewTransform(self.view_specs, self.mean, self.std))
        if stage in ("fit", "validate", "test"):
            val = self._load_images("val")
            self._datasets["val"] = None if val is None else self._plain_dataset(self._require_images(val, "val"))

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train", "fit")
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = SeededSampler(len(dataset), world_size, rank, self._training_seed())
        if self._resume_position is not None:
            sampler.load_state_dict(self._resume_position)
            self._resume_position = None
        in_memory = self._images_in_memory is not None  # then batches of indices only: no workers
        workers = 0 if in_memory else self.num_workers
        self._train_loader = ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last,
            num_workers=workers,
            pin_memory=self._pins_memory(),
            persistent_workers=self.persistent_workers and workers > 0,
            # Worker seeds from their own generator: loading never draws from the model's global RNG.
            generator=torch.Generator().manual_seed(sampler.seed),
            consumed_batches=self._consumed_train_batches,
            **({"collate_fn": IndexItems.collate_batch} if in_memory else {}),
        )
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        val = self._dataset("val", "validate")
        if val is None:
            return []
        if not self._knn_bank_requested:
            return self._plain_loader(val)
        if "bank" not in self._datasets:  # built here: callbacks request the bank after setup
            self._datasets["bank"] = self._plain_dataset(self._checked_images("bank"))
        return [self._plain_loader(val), self._plain_loader(self._datasets["bank"])]

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Device views seed their generator from the batch's first sample seed; reading it here, on
        # the host, avoids a device sync after the transfer.
        if isinstance(batch, dict) and isinstance(batch.get("seed"), torch.Tensor):
            return {**batch, "seed": int(batch["seed"][0])}
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Only training batches are touched: validation, kNN-bank and predict batches already hold
        # the CPU's un-augmented view.
        if self.trainer is None or not self.trainer.training:
            return batch
        seed = batch.get("seed") if isinstance(batch, dict) else None  # make_views_on_device consumes it
        if self.views_on_device:
            if self._images_in_memory is not None and "image" not in batch:
                batch = {**batch, "image": self._images_in_memory.gather(batch["index"])}
            if "image" in batch:
                batch = make_views_on_device(batch, self.device_views)
        if self.batch_styles and isinstance(batch, dict) and "views" in batch:
            batch = {**batch, "views": self._standardize_styles(batch["views"], seed)}
        return batch

    def test_dataloader(self) -> DataLoader:
        """The held-out split (the one validation uses; CIFAR's and STL-10's official test sets), un-augmented."""
        val = self._dataset("val", "test")
        if val is None:
            raise ValueError(f"{type(self).__name__} has no held-out split to test on (its val split is absent).")
        return self._plain_loader(val)

    def predict_dataloader(self) -> DataLoader:
        return self.plain_dataloader(self.predict_split)

    def plain_dataloader(self, split: Literal["train", "val"]) -> DataLoader:
        """The un-augmented train or val split in dataset order (predictions, frozen-feature evaluation)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        # The training split through the plain view is the kNN bank's dataset. Built here rather than
        # in setup: callbacks (EmbeddingWriter) choose the split in their setup, which runs after ours.
        key: Split = "bank" if split == "train" else "val"
        if self._datasets.get(key) is None:
            self._datasets[key] = self._plain_dataset(self._checked_images(key))
        return self._plain_loader(self._datasets[key])

    # Where training stands in the data, saved in every checkpoint (Lightning saves and restores a
    # DataModule's state_dict). It is restored here rather than through Lightning's loader-state
    # hook, which Lightning skips when configure_optimizers reads `estimated_stepping_batches` (that
    # starts the training loader before the loop state is read, as every method here does).

    def state_dict(self) -> dict:
        if self._train_loader is None or self.trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return {}
        return {"train_data_position": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        position = state_dict.get("train_data_position")
        if position is None:
            return
        if self._train_loader is None:
            self._resume_position = position  # train_dataloader() starts there
            return
        # Strategies that read checkpoints after setup (FSDP, DeepSpeed) have started the loader already.
        rank_zero_warn(
            "The training loader started before the checkpoint was read (a strategy that restores after "
            "setup): the resumed epoch restarts its data order; later epochs continue exactly."
        )
        self._train_loader.load_state_dict(position)

    # Internals.

    def _standardize_styles(self, views: list[torch.Tensor], seed: int | None) -> list[torch.Tensor]:
        """BSS on each view index separately (multi-crop views differ in size), on [0, 1] pixels: the
        paper standardises images, not normalised tensors, and the two differ at the DC term (a
        normalised mean can be negative, and an amplitude has no sign). Device-side views seed the
        choice from the batch's seed, so a resumed run restyles its batches the same way; CPU-path
        batches carry no seed and draw from the device's global generator."""
        device = views[0].device
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed + STYLE_SEED_OFFSET)
        if device not in self._pixel_stats:  # copied once per device, not once per batch
            stats = (torch.tensor(s, dtype=torch.float32).view(1, -1, 1, 1).to(device) for s in (self.mean, self.std))
            self._pixel_stats[device] = tuple(stats)
        mean, std = self._pixel_stats[device]
        return [
            (standardize_batch_styles(view * std + mean, generator, self.batch_styles_area_ratio, self.batch_styles_mix) - mean)
            / std
            for view in views
        ]

    def _keep_label_fraction(self, train: ImageSource) -> PartiallyLabelled:
        kept = labelled_subset(train.labels, self.label_fraction, self.label_fraction_seed, type(self).__name__)
        if self.trainer is not None and self.trainer.is_global_zero:
            write_labelled_subset(self.trainer.log_dir or self.trainer.default_root_dir, kept, self.label_fraction,
                                  self.label_fraction_seed)
        return PartiallyLabelled(train, kept)

    def _plain_dataset(self, source: ImageSource) -> ViewDataset:
        plain = resolve_views("none", self.image_size, self.in_chans)
        return ViewDataset(source, MultiViewTransform(plain, self.mean, self.std))

    def _checked_images(self, split: Split) -> ImageSource:
        images = self._load_images(split)
        if images is None:
            raise ValueError(f"{type(self).__name__} has no {split} split")
        return self._require_images(images, split)

    def _require_images(self, images: ImageSource, split: Split) -> ImageSource:
        if len(images) == 0:
            raise ValueError(f"{type(self).__name__}: the {split} split is empty (0 images)")
        check_labels(images, self.num_classes, f"{type(self).__name__} {split} split")
        return images

    def _check_batch_fits(self, num_train: int) -> None:
        """With drop_last, a batch larger than a process's share of the data would give 0 steps."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        per_process = math.ceil(num_train / world_size)
        if self.drop_last and self.batch_size > per_process:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the {per_process} training images per process "
                f"({num_train} images over {world_size} process(es)); with drop_last=True no batch would be "
                "produced: lower batch_size or set drop_last=False"
            )

    def _dataset(self, split: Split, stage: str) -> ViewDataset | None:
        if split not in self._datasets:
            raise RuntimeError(f"{type(self).__name__}.setup({stage!r}) must run before the {split} dataloader")
        return self._datasets[split]

    def _device_type(self) -> str:
        return self.trainer.strategy.root_device.type if self.trainer is not None else "cpu"

    def _pins_memory(self) -> bool:
        return self.pin_memory if self.pin_memory is not None else self._device_type() == "cuda"

    def _resolve_view_device(self) -> Literal["cpu", "device"]:
        device_type = self._device_type()
        placement = resolve_view_device(
            self.view_device, all(spec.augments for spec in self.view_specs), self.stores_one_image_size,
            self.image_size, device_type,
        )
        for option in ("in_memory", "compile_views"):
            if getattr(self, option) and placement != "device":
                raise ValueError(
                    f"{option}=True needs device-side views, but view_device='auto' chose the CPU path for "
                    f"{type(self).__name__} (a recipe without augmentation, or images of varied sizes): set {option}=False"
                )
        return placement

    def _training_seed(self) -> int | None:
        if self.seed is not None:
            return self.seed
        global_seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything
        return int(global_seed) if global_seed is not None else None

    def _consumed_train_batches(self) -> tuple[int, bool]:
        """Batches of the current epoch that training has taken, and whether the epoch is over."""
        taken = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return taken, taken >= self.trainer.num_training_batches

    def _plain_loader(self, dataset: ViewDataset) -> DataLoader:
        """Evaluation order: every image once, in dataset order."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self._pins_memory(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )
