"""rnntool: the RNN-Transducer loss as a torch loss and a command-line tool.

Public API: ``rnnt_loss`` and ``TransducerLoss`` (the loss engine on Numba CPU
and CUDA kernels) and ``reference_rnnt_loss`` (the float64 oracle).
"""

__version__ = "0.1.0"

from .loss import TransducerLoss, rnnt_loss  # noqa: E402
from .reference import reference_rnnt_loss  # noqa: E402

__all__ = ["TransducerLoss", "rnnt_loss", "reference_rnnt_loss", "__version__"]
