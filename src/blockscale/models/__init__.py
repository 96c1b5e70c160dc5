"""The model zoo: CIFAR-style ResNets, VGG-BN and MobileNetV2, built by name through a registry."""

from blockscale.models._registry import create_model, list_models, register_model
from blockscale.models.checkpoint import load_checkpoint, save_checkpoint
from blockscale.models.mobilenetv2 import InvertedResidual, MobileNetV2
from blockscale.models.resnet import BasicBlock, CifarResNet
from blockscale.models.vgg import VGG

__all__ = [
    "VGG",
    "BasicBlock",
    "CifarResNet",
    "InvertedResidual",
    "MobileNetV2",
    "create_model",
    "list_models",
    "load_checkpoint",
    "register_model",
    "save_checkpoint",
]
