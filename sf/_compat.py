"""Import-order fixes for the pinned stack; imported by `sf/__init__.py` before anything else.

torchvision 0.28.0 on PyPI is a CUDA build. Paired with the CPU build of torch 2.13 its import fails with
``operator torchvision::nms does not exist``: it registers fake kernels for two ops whose schemas live in its
missing C++ extension. Defining those two schemas first lets torchvision (and timm, open_clip, diffusers, which
import it) load; transforms work, ``torchvision.ops``/``torchvision.io`` do not. With the real ops present
(a CUDA machine, or a matching CPU torchvision) this does nothing.
"""

import torch

_TORCHVISION_OPS = ("nms", "qnms")
_library = None  # keep the Library alive: its definitions vanish when it is garbage-collected


def _define_missing_torchvision_ops() -> None:
    global _library
    missing = [op for op in _TORCHVISION_OPS if not _op_exists(op)]
    if not missing or _torchvision_extension_loads():
        return
    _library = torch.library.Library("torchvision", "DEF")
    for op in missing:
        _library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def _torchvision_extension_loads() -> bool:
    """True when torchvision's compiled ops would register themselves (matching torch build)."""
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # nothing to fix: torchvision is not installed
    import glob
    import os

    for location in spec.submodule_search_locations:
        for lib in glob.glob(os.path.join(location, "_C*.so")):
            try:
                torch.ops.load_library(lib)
                return True
            except (OSError, RuntimeError):
                return False
    return False


_define_missing_torchvision_ops()
