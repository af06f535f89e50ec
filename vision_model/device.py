"""Turning a device name from the command line or an API call into a torch.device."""
from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto": the current CUDA device (the one torch.cuda.set_device chose, e.g. a DDP rank's) when CUDA is
    available, else the CPU; any other name as torch reads it ("cpu", "cuda", "cuda:1")."""
    if str(name) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)
