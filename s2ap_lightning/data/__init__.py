"""Datasets and the shared DataModule."""

from s2ap_lightning.data.datamodule import RobustDataModule
from s2ap_lightning.data.datasets import DATASETS, DatasetInfo

__all__ = ["DATASETS", "DatasetInfo", "RobustDataModule"]
