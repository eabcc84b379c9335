import os

import torch

# Without a GPU, the Triton backend runs through Triton's interpreter on CPU tensors. It
# must be switched on before triton is first imported (fused_residual.triton imports it).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

torch.manual_seed(0)
