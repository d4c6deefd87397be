"""The model's one door to its sequence-mixing kernels: Triton on CUDA tensors, the fp32 PyTorch references otherwise.

Under torch.compile (distillation compiles each decoder layer) the chunked ops are graph breaks: their autograd
Functions pick tile sizes in Python and launch autotuned Triton kernels in backward, which dynamo would have to
trace; eager, they are already one launch per kernel. The decode steps and the gated norm's forward and backward
are custom ops, which compiled graphs keep whole.
"""

import torch

# `hybridize push` reads these import lines to write the exported model's ops.py (hybridize.publish.export).
from hybridize.kernels.conv1d import causal_conv1d, causal_conv1d_step
from hybridize.kernels.decode_attention import decode_attention, rope_store
from hybridize.kernels.gated_delta import GateParams, chunk_gated_delta_rule, gated_delta_layer_step, gated_delta_step
from hybridize.kernels.norm import gated_rms_norm
from hybridize.kernels.ssd import chunk_ssd, ssd_layer_step, ssd_step

causal_conv1d = torch.compiler.disable(causal_conv1d)
chunk_gated_delta_rule = torch.compiler.disable(chunk_gated_delta_rule)
chunk_ssd = torch.compiler.disable(chunk_ssd)

__all__ = [
    "causal_conv1d",
    "causal_conv1d_step",
    "decode_attention",
    "rope_store",
    "GateParams",
    "chunk_gated_delta_rule",
    "gated_delta_step",
    "gated_delta_layer_step",
    "gated_rms_norm",
    "chunk_ssd",
    "ssd_step",
    "ssd_layer_step",
]
