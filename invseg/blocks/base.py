"""The contract shared by every invertible block (FrEIA-style ``InvertibleModule``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from invseg.utils import tensor_tuple

__all__ = ["InvertibleModule"]


class InvertibleModule(nn.Module):
    """Base class of invertible blocks: ``forward(*x)`` and ``inverse(*y)``.

    Implementers guarantee:

    * ``inverse(*tensor_tuple(forward(*x)))`` equals ``x`` up to floating-point rounding (and, for
      blocks whose inverse is iterative such as :class:`~invseg.blocks.InvertibleResidual`, up to
      the documented tolerance), and ``forward(*inverse(*y))`` equals ``y`` likewise.
    * Shapes: a block maps ``num_inputs`` tensors to ``num_outputs`` tensors. Most blocks map one
      tensor ``(B, C, *spatial)`` to one tensor; resampling changes ``C`` and ``spatial`` by the
      factor ``2**spatial_dims``; :class:`~invseg.blocks.ChannelSplit` maps 1 -> 2 tensors and
      :class:`~invseg.blocks.ChannelMerge` 2 -> 1. A single output is returned as a tensor, several
      as a tuple.
    * ``forward`` and ``inverse`` are deterministic functions of the inputs, the parameters and the
      (frozen) spectral-normalization state: no dropout, no batch statistics. ``inverse`` never
      changes any state (parameters, buffers, spectral state); ``forward`` may only initialise
      spectral state the way :mod:`invseg.layers` documents (never inside a recomputation, where
      :func:`invseg.layers.spectral_state_frozen` is active).

    Every block is usable with memcnn (``memcnn.is_invertible_module(block, shape)`` holds) and with
    :class:`~invseg.blocks.InvertibleSequence`, whose memory-efficient mode frees the activations
    in forward and rebuilds them with :meth:`inverse` in backward, one block at a time, through
    :meth:`backward_step`.
    """

    num_inputs: int = 1
    num_outputs: int = 1

    def inverse(self, *y: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Compute the input ``x`` from the output ``y`` of :meth:`forward`."""
        raise NotImplementedError

    def backward_step(
        self,
        y: tuple[Tensor, ...],
        grad_y: tuple[Tensor, ...],
        params: tuple[nn.Parameter, ...],
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        """Reconstruct the input from ``y`` and back-propagate ``grad_y`` through this block.

        Called by the memory-efficient backward with grad mode enabled, inside
        :func:`invseg.layers.spectral_state_frozen` and under the autocast state of the forward
        pass. The default inverts without grad and re-runs :meth:`forward` on the reconstructed
        input; blocks override it when the inversion already computes what the re-run would
        (one-sided couplings compute their sub-network once).

        Args:
            y: the block's outputs (detached).
            grad_y: gradients of the loss with respect to ``y``.
            params: the block's parameters that require grad.

        Returns:
            ``(x, grad_x, grad_params)``: the reconstructed inputs (detached), the gradients with
            respect to them, and one gradient (or ``None`` when unused) per entry of ``params``.
        """
        with torch.no_grad():
            x = tensor_tuple(self.inverse(*y))
        leaves = tuple(t.detach().requires_grad_() for t in x)
        out = tensor_tuple(self.forward(*leaves))
        grads = torch.autograd.grad(out, leaves + tuple(params), grad_y, allow_unused=True)
        n = len(leaves)
        return x, _zeros_for_none(grads[:n], x), grads[n:]


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, like))
