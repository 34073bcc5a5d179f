"""sf: self-forcing distillation of video diffusion transformers into causal few-step students."""

from sf import _compat  # noqa: F401  (must run before torchvision, timm, open_clip or diffusers are imported)

__version__ = "0.1.0"
