"""Sequence-mixing kernels: one folder per op, each with an fp32 PyTorch reference and a Triton version.

Every op folder exposes the same public names from its `__init__.py`, with a keyword-only
`backend=` switch: "auto" picks Triton for CUDA tensors and the reference otherwise,
"triton" forces the Triton kernels (on CPU this needs TRITON_INTERPRET=1), "reference" forces PyTorch.
"""
