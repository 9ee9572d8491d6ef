"""Multi-scale deformable attention: a native CPU/CUDA op with a pure-PyTorch fallback, and ``MSDeformAttn``.

Importing ``deformable`` loads the op and the module only. The detector is the top-level package ``models``; the
layers above it are subpackages imported by name: ``deformable.data``, ``deformable.training``,
``deformable.inference`` and ``deformable.viz`` (README, "Architecture").
"""

from ._extension import native_available
from .backend import backend as backend
from .cope import CoPE
from .cope_locate import cope_locate, cope_locate_lines, cope_locate_pytorch
from .cope_sampling import CoPESampling
from .modules import MSDeformAttn
from .ops import ms_deform_attn
from .recording import SamplingRecord, cope_line_densities, recording
from .reference import ms_deform_attn_pytorch

__all__ = [
    "CoPE",
    "CoPESampling",
    "MSDeformAttn",
    "SamplingRecord",
    "cope_line_densities",
    "cope_locate",
    "cope_locate_lines",
    "cope_locate_pytorch",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "native_available",
    "recording",
]
__version__ = "0.1.0"
