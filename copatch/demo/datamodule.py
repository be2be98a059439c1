"""`DemoReferDataModule`: the REFER DataModule over the demo dataset, written on first use."""

from __future__ import annotations

from pathlib import Path

from copatch.datamodules.refer import ReferDataModule
from copatch.demo.dataset import DATASET, write_demo_refer


class DemoReferDataModule(ReferDataModule):
    """`ReferDataModule(dataset="demo", split_by="unc")` over `root`, which `prepare_data` fills with
    `write_demo_refer(root, num_images, seed, split)` when it holds no demo dataset yet. An existing
    dataset is reused as is (delete `root` to regenerate with other arguments). Its stored
    proposals are under `<root>/proposals`.
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
        super().prepare_data()
