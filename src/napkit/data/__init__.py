"""Datasets (``create_splits``) and deterministic loaders (``make_loader``)."""

from napkit.data.datasets import DataSplits, create_splits, list_datasets, register_dataset
from napkit.data.fingerprint import data_fingerprint
from napkit.data.loaders import make_loader

__all__ = ["DataSplits", "create_splits", "data_fingerprint", "list_datasets", "make_loader", "register_dataset"]
