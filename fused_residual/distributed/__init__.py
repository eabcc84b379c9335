"""The fused tail with BatchNorm statistics synchronized across processes (torch.distributed).

`SyncBatchNormAddReLU2d` (an nn.SyncBatchNorm subclass), its functional forms
`sync_bn_add_relu` and `sync_dual_bn_add_relu`, and `convert_sync_batchnorm`. The distributed
engine is torch.distributed (NCCL on GPUs, gloo on CPUs); this package adds one all_gather per
forward and one all_reduce per backward between a backend's primitive ops
(docs/op_layer.md).
"""

from .functional import sync_bn_add_relu, sync_dual_bn_add_relu
from .modules import SyncBatchNormAddReLU2d, convert_sync_batchnorm

__all__ = [
    "SyncBatchNormAddReLU2d",
    "convert_sync_batchnorm",
    "sync_bn_add_relu",
    "sync_dual_bn_add_relu",
]
