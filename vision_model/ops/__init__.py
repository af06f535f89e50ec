"""The encoder's kernels, each Triton kernel beside the readable `*_ref` it must match; `backends` only chooses."""
