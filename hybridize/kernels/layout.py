"""Memory layouts the decode-step kernels accept without a copy."""

import torch


def batch_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, ...] with every axis after the batch one contiguous, copied only if it is not already: the kernels take
    the batch stride as it is, so rows of a wider tensor (a view of the step's projections) go in as they are."""
    return x if x[0].is_contiguous() else x.contiguous()


def check_layer_step_buffers(conv_state: torch.Tensor, state: torch.Tensor, channels: int, width: int) -> None:
    """The buffers a layer's decode step updates in place: conv_state [B, channels, width-1] (the conv's last inputs)
    and the recurrent state [B, ...], fp32 and contiguous."""
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous fp32 {list(state.shape)} tensor")
    if conv_state.shape != (state.shape[0], channels, width - 1):
        raise ValueError(f"conv_state must be [B, D, W-1] = {(state.shape[0], channels, width - 1)}, "
                         f"got {tuple(conv_state.shape)}")
