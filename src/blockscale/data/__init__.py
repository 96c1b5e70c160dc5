"""Data sets for training, retraining and profiling: Fashion-MNIST, CIFAR, image folders, synthetic.

Every built-in data set yields ``(float32 CxHxW normalised tensor, int label)`` and carries
``num_classes``, ``in_channels``, ``input_size`` and ``classes``. Any other
``torch.utils.data.Dataset`` works with blockscale too.
"""

from blockscale.data._base import (
    DatasetInfo,
    VisionDataset,
    dataset_info,
    subset,
    train_val_split,
)
from blockscale.data._registry import list_datasets, load_dataset
from blockscale.data.cifar import CIFAR10, CIFAR100, load_cifar_batch
from blockscale.data.fashion_mnist import (
    FashionMNIST,
    download_fashion_mnist,
    find_fashion_mnist,
    read_idx,
)
from blockscale.data.image_folder import ImageFolderDataset
from blockscale.data.synthetic import SyntheticDataset

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "DatasetInfo",
    "FashionMNIST",
    "ImageFolderDataset",
    "SyntheticDataset",
    "VisionDataset",
    "dataset_info",
    "download_fashion_mnist",
    "find_fashion_mnist",
    "list_datasets",
    "load_cifar_batch",
    "load_dataset",
    "read_idx",
    "subset",
    "train_val_split",
]
