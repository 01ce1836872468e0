"""rnntool: the RNN-Transducer loss as a torch loss and a command-line tool.

Public API: ``rnnt_loss`` and ``RNNTLoss`` (torchaudio's function and module, its
signature and defaults) and ``TransducerLoss`` (SpeechBrain's module, its values):
the loss engine on Numba CPU and CUDA kernels; ``reference_rnnt_loss`` (the
float64 oracle), the HDF5 dump format's ``DumpWriter``/``DumpReader``, and
``align`` (Viterbi paths, emission posteriors, occupancy); ``tdt_loss`` and
``TDTLoss``, the Token-and-Duration Transducer loss on the same kind of kernels.
They are imported on first use, so that ``rnntool --help`` does not pay for torch.
"""

__version__ = "0.1.0"

__all__ = [
    "TransducerLoss", "RNNTLoss", "rnnt_loss", "reference_rnnt_loss", "align", "Alignment",
    "DumpWriter", "DumpReader", "DumpError", "DumpWriteError", "ImpossibleLossWarning",
    "tdt_loss", "TDTLoss", "__version__",
]

_LAZY = {
    "rnnt_loss": "loss",
    "TransducerLoss": "loss",
    "RNNTLoss": "loss",
    "reference_rnnt_loss": "reference",
    "Alignment": "align",
    "DumpWriter": "dump",
    "DumpReader": "reader",
    "DumpError": "dump",
    "DumpWriteError": "dump",
    "ImpossibleLossWarning": "engine",
    "tdt_loss": "tdt",
    "TDTLoss": "tdt",
}


def __getattr__(name):
    if name == "align":  # the module, callable as its align function (align.py)
        import importlib

        return importlib.import_module(".align", __name__)
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rnntool' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY, "align"})
