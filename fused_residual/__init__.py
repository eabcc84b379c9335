"""fused_residual: BatchNorm2d + residual add + ReLU fused into single memory-bound passes.

Public API: `bn_add_relu`, `dual_bn_add_relu`, `BatchNormAddReLU2d`, `FusedResidualBlock`,
`convert` (fuse every BatchNorm + ReLU / + add + ReLU a model computes, in place), `convert_report`,
`unconvert`,
`available_backends`; synchronized across processes (torch.distributed):
`SyncBatchNormAddReLU2d`, `sync_bn_add_relu`, `sync_dual_bn_add_relu`,
`convert_sync_batchnorm`; deployment (README, "Deploying a converted model"): `export_unfused`,
`unfused`.
"""

from .backends import available_backends
from .convert import ConvertReport, convert, convert_report, unconvert
from .distributed import (
    SyncBatchNormAddReLU2d,
    convert_sync_batchnorm,
    sync_bn_add_relu,
    sync_dual_bn_add_relu,
)
from .export import export_unfused, unfused
from .functional import bn_add_relu, dual_bn_add_relu
from .modules import BatchNormAddReLU2d, FusedResidualBlock

__all__ = [
    "BatchNormAddReLU2d",
    "ConvertReport",
    "FusedResidualBlock",
    "SyncBatchNormAddReLU2d",
    "available_backends",
    "bn_add_relu",
    "convert",
    "convert_report",
    "convert_sync_batchnorm",
    "dual_bn_add_relu",
    "export_unfused",
    "sync_bn_add_relu",
    "sync_dual_bn_add_relu",
    "unconvert",
    "unfused",
]
__version__ = "0.1.0"
