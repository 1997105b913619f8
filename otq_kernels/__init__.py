"""otq_kernels: low-bit codebook quantization and fused LUT kernels for Flow Matching models.

Nothing here touches a GPU, compiles or allocates at import time.
"""

from . import nn, ops
from .checkpoint import load_quantized, save_quantized
from .dispatch_log import record_dispatch
from .format import QuantizedTensor, pack_codes, plane_widths, unpack_codes
from .nn import dequantize_model, quantize_model
from .quantizers import METHODS, fake_quantize, fake_quantize_state_dict, fit_codebook
from .streaming import load_and_quantize

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "QuantizedTensor",
    "dequantize_model",
    "fake_quantize",
    "fake_quantize_state_dict",
    "fit_codebook",
    "load_and_quantize",
    "load_quantized",
    "nn",
    "ops",
    "pack_codes",
    "plane_widths",
    "quantize_model",
    "record_dispatch",
    "save_quantized",
    "unpack_codes",
]
