"""Datasets and the shared DataModule."""

from s2ap_lightning.data.datamodule import RobustDataModule
from s2ap_lightning.data.datasets import DATASETS, DatasetInfo, split_tensors

__all__ = ["DATASETS", "DatasetInfo", "RobustDataModule", "split_tensors"]
