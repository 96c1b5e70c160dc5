"""blockscale: block-grained scaling of deep neural networks for mobile and edge devices.

The stable surface is re-exported here; stage modules (``blockscale.extract``, ``blockscale.derive``,
``blockscale.bank``, ...) hold the details, and names with a leading underscore are private.
"""

from ._version import __version__
from .bank import Bank
from .data import list_datasets, load_dataset
from .derive import Descendant, derive
from .errors import BlockscaleError
from .extract import Decomposition, compose, extract
from .models import create_model, list_models, load_checkpoint, save_checkpoint
from .multi import SwitchCost
from .pipeline import BuildConfig, build
from .runtime import (
    ModelSlot,
    MultiRuntime,
    MultiSwitchReport,
    Runtime,
    RuntimeConfig,
    SwitchReport,
)
from .train import TrainConfig, evaluate, train
from .types import BlockInfo, BlockPlan, Budget, DeriveConfig, DescendantInfo, Profile, Selection

__all__ = [
    "Bank",
    "BlockInfo",
    "BlockPlan",
    "BlockscaleError",
    "Budget",
    "BuildConfig",
    "Decomposition",
    "DeriveConfig",
    "Descendant",
    "DescendantInfo",
    "ModelSlot",
    "MultiRuntime",
    "MultiSwitchReport",
    "Profile",
    "Runtime",
    "RuntimeConfig",
    "Selection",
    "SwitchCost",
    "SwitchReport",
    "TrainConfig",
    "__version__",
    "build",
    "compose",
    "create_model",
    "derive",
    "evaluate",
    "extract",
    "list_datasets",
    "list_models",
    "load_checkpoint",
    "load_dataset",
    "save_checkpoint",
    "train",
]
