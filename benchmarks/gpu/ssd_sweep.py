"""GPU diagnostic: mamba-ssm's Triton chunk scan vs the float64 recurrence over shapes (seqlen, chunk, d_state)."""
import itertools
import json
import time

import torch

from vision_model.ops.backends import triton_chunk_scan
from vision_model.ops.ssd_minimal import ssd_chunked, ssd_recurrent

scan = triton_chunk_scan()
torch.manual_seed(0)
for seqlen, chunk, dstate, headdim, nheads in itertools.product((50, 197), (64, 256), (32, 128), (16,), (24,)):
    b = 4
    x = torch.randn(b, seqlen, nheads, headdim, device="cuda")
    dt = torch.randn(b, seqlen, nheads, device="cuda") - 2
    dt_bias = torch.rand(nheads, device="cuda") - 4
    A = -torch.rand(nheads, device="cuda") * 8
    B = torch.randn(b, seqlen, 1, dstate, device="cuda")
    C = torch.randn(b, seqlen, 1, dstate, device="cuda")
    D = torch.randn(nheads, device="cuda")
    t = time.perf_counter()
    y_tri = scan(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
    torch.cuda.synchronize()
    t = time.perf_counter() - t
    dtp = torch.nn.functional.softplus(dt + dt_bias)
    ref = ssd_recurrent(*(v.double() for v in (x, dtp, A, B, C, D)))
    y_chk = ssd_chunked(x, dtp, A, B, C, D, chunk_size=chunk)
    rel = lambda a: ((a.double() - ref).norm() / ref.norm()).item()
    print(json.dumps({"seqlen": seqlen, "chunk": chunk, "dstate": dstate, "triton_vs_ref": rel(y_tri),
                      "torch_chunked_vs_ref": rel(y_chk), "first_call_s": round(t, 2)}), flush=True)
