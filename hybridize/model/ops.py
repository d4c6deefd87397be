"""The model's one door to its sequence-mixing kernels: Triton on CUDA tensors, the fp32 PyTorch references otherwise."""

from hybridize.kernels.conv1d import causal_conv1d, causal_conv1d_step
from hybridize.kernels.gated_delta import chunk_gated_delta_rule, gated_delta_step
from hybridize.kernels.norm import gated_rms_norm
from hybridize.kernels.ssd import chunk_ssd, ssd_step

__all__ = [
    "causal_conv1d",
    "causal_conv1d_step",
    "chunk_gated_delta_rule",
    "gated_delta_step",
    "gated_rms_norm",
    "chunk_ssd",
    "ssd_step",
]
