"""The trainer: what torchrun runs in each stage's processes (`python -m vlm_trainer --config <uri>`)."""

from vlm_core import __version__

__all__ = ["__version__"]
