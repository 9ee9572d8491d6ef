"""Multi-scale deformable attention: a native CPU/CUDA op with a pure-PyTorch fallback, and ``MSDeformAttn``."""

from ._extension import native_available
from .modules import MSDeformAttn
from .ops import ms_deform_attn
from .reference import ms_deform_attn_pytorch

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_pytorch", "native_available"]
__version__ = "0.1.0"
