"""GPU check (not part of CI): the Triton SSD backend agrees with the PyTorch backend, forward and gradients.

    python benchmarks/gpu/check_backends.py        # needs CUDA and mamba-ssm

Relative error ||a - b|| / ||b|| per output and per parameter gradient, at every trained level and a Mix'n'Match
config, in fp32 (Triton dots run in tf32) and bf16 autocast; then a bf16 forward+backward of the 135M config.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from benchmarks.measure import rel_error as rel
from vision_model import create_model
from vision_model.ops.backends import resolve_backend


def level_settings(model, widths_mnm) -> list[tuple[str, dict]]:
    """(label, embed/forward kwargs) for every trained level and one Mix'n'Match config."""
    return [("D" if lv == 1 else f"D/{lv}", dict(level=lv)) for lv in model.config.levels] + \
        [("mnm", dict(widths=widths_mnm))]


def compare(name: str, img: int, batch: int, widths_mnm, amp: bool, tol_out: float, tol_grad: float) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(name).cuda().eval()  # eval: drop-path would draw different masks per backend
    x = torch.randn(batch, model.config.in_chans, img, img, device="cuda")
    settings = level_settings(model, widths_mnm)
    rows = []
    for label, kw in settings:
        outs, grads = {}, {}
        for backend in ("torch", "triton"):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = model(x, backend=backend, **kw)
            out.float().square().mean().backward()
            outs[backend] = out.detach().float()
            grads[backend] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        if any(torch.isnan(t).any() for t in outs.values()):
            raise SystemExit(f"NaN in {name} {label}")
        g_err = max(rel(grads["triton"][n], grads["torch"][n]) for n in grads["torch"])
        row = {"model": name, "img": img, "amp": amp, "setting": label, "out_rel_err": rel(outs["triton"], outs["torch"]),
               "max_grad_rel_err": g_err}
        row["ok"] = row["out_rel_err"] < tol_out and g_err < tol_grad
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def compare_inference(name: str, img: int, batch: int, widths_mnm, amp: bool, tol_out: float) -> list[dict]:
    """Inference takes other kernels than training (the one-kernel SSD forward, the fused conv): embeddings of the
    Triton backend against the PyTorch backend with autograd off."""
    torch.manual_seed(0)
    model = create_model(name).cuda().eval()
    x = torch.randn(batch, model.config.in_chans, img, img, device="cuda")
    settings = level_settings(model, widths_mnm)
    rows = []
    for label, kw in settings:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            outs = {backend: model.embed(x, backend=backend, **kw).float() for backend in ("torch", "triton")}
        row = {"model": name, "img": img, "amp": amp, "setting": label, "inference": True,
               "out_rel_err": rel(outs["triton"], outs["torch"])}
        row["ok"] = row["out_rel_err"] < tol_out and bool(torch.isfinite(outs["triton"]).all())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bf16_train_step(name: str, img: int, batch: int) -> dict:
    model = create_model(name).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, img, img, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(4):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    row = {"model": name, "img": img, "batch": batch, "loss": loss.item(), "step_s_median": sorted(times)[2],
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "ok": bool(torch.isfinite(loss))}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    print("backend for CUDA tensors:", resolve_backend("auto", torch.device("cuda")), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # keep the PyTorch reference in true fp32
    rows = []
    fm = [192, 192, 96, 96, 48, 48, 24, 24]
    rows += compare("matmamba_vision_fmnist", 28, 64, fm, amp=False, tol_out=5e-3, tol_grad=1e-2)
    rows += compare("matmamba_vision_fmnist", 28, 64, fm, amp=True, tol_out=3e-2, tol_grad=5e-2)
    mnm35 = [512] * 5 + [256] * 5 + [128] * 5 + [64] * 5
    rows += compare("matmamba_vision_35m", 224, 4, mnm35, amp=False, tol_out=5e-3, tol_grad=1e-2)
    rows += compare("matmamba_vision_35m", 224, 4, mnm35, amp=True, tol_out=3e-2, tol_grad=5e-2)
    rows += compare_inference("matmamba_vision_fmnist", 28, 64, fm, amp=False, tol_out=5e-3)
    rows += compare_inference("matmamba_vision_fmnist", 28, 64, fm, amp=True, tol_out=3e-2)
    mnm135 = [1024] * 5 + [512] * 5 + [256] * 5 + [128] * 5
    rows += compare_inference("matmamba_vision_135m", 512, 2, mnm135, amp=False, tol_out=5e-3)
    rows += compare_inference("matmamba_vision_135m", 512, 2, mnm135, amp=True, tol_out=3e-2)
    rows.append(bf16_train_step("matmamba_vision_135m", 224, 32))
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
