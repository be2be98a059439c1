"""`DemoReferDataModule`: the REFER DataModule over the demo dataset, written on first use."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from copatch.datamodules.refer import ReferDataModule, ReferDataset
from copatch.demo.dataset import DATASET, REGENERATE, check_demo_files, upgrade_demo_images, write_demo_refer
from copatch.errors import UserValueError
from copatch.types import ImageSample


class DemoReferDataset(ReferDataset):
    """`ReferDataset` over demo data whose failure messages name the demo fix (regenerate the folder)
    instead of the COCO downloads the REFER reader's messages point at."""

    def __init__(self, root: str | Path, *args, **kwargs) -> None:
        super().__init__(root, *args, **kwargs)
        self.demo_root = Path(root)

    def __getitem__(self, index: int) -> ImageSample:
        fix = REGENERATE.format(root=self.demo_root)
        try:
            sample = super().__getitem__(index)
        except ValueError as err:  # an index that does not fit its images: only a damaged folder
            raise UserValueError(f"demo data under {self.demo_root} is damaged ({err}). {fix}") from err
        if sample.error is not None:  # recorded as a failure of this image's expressions
            path = self.entries[index].path
            reason = "is missing" if not path.is_file() else "is unreadable or not of the size instances.json says"
            sample = dataclasses.replace(sample, error=f"demo image {path} {reason}. {fix}")
        return sample


class DemoReferDataModule(ReferDataModule):
    """`ReferDataModule(dataset="demo", split_by="unc")` over `root`, which `prepare_data` fills with
    `write_demo_refer(root, num_images, seed, split)` when it holds no demo dataset yet. An existing
    dataset is reused as is (delete `root` to regenerate with other arguments); one written before the
    images had `.png` names is renamed in place (`upgrade_demo_images`), and an incomplete one stops
    with a message naming the missing file. Its stored proposals are under `<root>/proposals`.
    """

    def __init__(
        self,
        root: str = "outputs/demo-data",
        num_images: int = 60,
        seed: int = 1,
        split: str = "val",
        batch_size: int = 1,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__(
            root=root, dataset=DATASET, split_by="unc", split=split, image_root=None,
            batch_size=batch_size, num_workers=num_workers, gt_mask_rule="union", limit=limit,
        )
        self.num_images, self.seed = num_images, seed

    @property
    def proposals_root(self) -> Path:
        return Path(self.root) / "proposals"

    def prepare_data(self) -> None:
        if not (Path(self.root) / DATASET / "refs(unc).p").is_file():
            write_demo_refer(self.root, num_images=self.num_images, seed=self.seed, split=self.split)
        else:
            upgrade_demo_images(self.root)
        check_demo_files(self.root)  # before the REFER checks, whose messages name the COCO downloads
        super().prepare_data()

    def build_dataset(self) -> DemoReferDataset:
        return DemoReferDataset(
            self.root, self.dataset_name, self.split_by, self.split, self.image_root,
            self.gt_mask_rule, self.limit, "record",  # type: ignore[arg-type]
        )
