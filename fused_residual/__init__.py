"""fused_residual: BatchNorm2d + residual add + ReLU fused into single memory-bound passes.

Public API: `bn_add_relu`, `dual_bn_add_relu`, `BatchNormAddReLU2d`, `FusedResidualBlock`,
`convert` (fuse the ResNet blocks of a torchvision or timm model in place), `convert_report`,
`available_backends`.
"""

from .backends import available_backends
from .convert import ConvertReport, convert, convert_report
from .functional import bn_add_relu, dual_bn_add_relu
from .modules import BatchNormAddReLU2d, FusedResidualBlock

__all__ = [
    "BatchNormAddReLU2d",
    "ConvertReport",
    "FusedResidualBlock",
    "available_backends",
    "bn_add_relu",
    "convert",
    "convert_report",
    "dual_bn_add_relu",
]
__version__ = "0.1.0"
