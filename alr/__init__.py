"""alr: fused Adam, AdamW and SGD for PyTorch with an adaptive learning rate.

``ALROptimizer`` fuses the gradient statistics (global norm clipping, nonfinite skipping,
hypergradient dot products), the learning-rate adaptation and the weight update into one
pass per (device, dtype). ``Adam``, ``AdamW`` and ``SGD`` are drop-in replacements for
their ``torch.optim`` namesakes with the adaptation off.
"""

__version__ = "0.1.0"

from ._extension import build_info
from .backends import ALRBackendFallbackWarning, available_backends
from .dropin import SGD, Adam, AdamW
from .functional import alr_step
from .optimizer import ALROptimizer, ALRStats

__all__ = [
    "ALROptimizer",
    "ALRStats",
    "Adam",
    "AdamW",
    "SGD",
    "ALRBackendFallbackWarning",
    "alr_step",
    "available_backends",
    "build_info",
    "__version__",
]
