"""Fast attention kernels over the packed format (optional; the PyTorch path is the reference)."""
