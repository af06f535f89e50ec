"""GPU diagnostic: capture block 0's real SSD inputs in the Fashion-MNIST model and compare the Triton kernel
with the PyTorch SSD on exactly those inputs, as strided views and made contiguous."""
import json

import torch

import vision_model.block as block
from vision_model import create_model
from vision_model.ops.backends import triton_chunk_scan
from vision_model.ops.ssd_minimal import ssd_chunked, ssd_recurrent

captured = []
real = block.ssd_scan
block.ssd_scan = lambda *a, **kw: (captured.append((a, kw)), real(*a, **kw))[1]
torch.manual_seed(0)
model = create_model("matmamba_vision_fmnist").cuda()
with torch.no_grad():
    model(torch.randn(64, 1, 28, 28, device="cuda"), backend="torch")
(x, dt, A, B, C, D, dt_bias), kw = captured[0]
dtp = torch.nn.functional.softplus(dt.float() + dt_bias)
ref = ssd_recurrent(*(t.double() for t in (x, dtp, A, B, C, D)))
rel = lambda y: ((y.double() - ref).norm() / ref.norm()).item()
scan = triton_chunk_scan()
row = {"strides": {n: t.stride() for n, t in zip("x dt B C".split(), (x, dt, B, C))},
       "torch": rel(ssd_chunked(x, dtp, A, B, C, D, chunk_size=kw["chunk_size"]))}
for name, args in (("as_given", (x, dt, B, C)), ("contiguous", tuple(t.contiguous() for t in (x, dt, B, C))),
                   ("dt_contiguous_only", (x, dt.contiguous(), B, C))):
    xx, dd, bb, cc = args
    row[name] = rel(scan(xx, dd, A, bb, cc, kw["chunk_size"], D=D, dt_bias=dt_bias, dt_softplus=True))
print(json.dumps(row), flush=True)
