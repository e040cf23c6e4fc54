"""Rounding in the training loop (profile keys ``round_accumulators``: bits, ``round_from``: the
first epoch that rounds), shared by the recipes.

Concrete ML's ``rounding_threshold_bits`` keeps the ``bits`` most significant bits of every
accumulator that feeds a lookup: it removes ``lsbs = width - bits`` low bits, ``width`` being
the bit width of the integer range the calibration images give that accumulator (all measured
in one pass of the unrounded network), rounding half up (the ``APPROXIMATE`` method adds
off-by-one errors near the halves, which this does not model). :class:`AccumulatorRounding`
applies the same rounding to the outputs of a Brevitas network's layers during training, with a
straight-through gradient, so that the weights learn to live with it;
:meth:`AccumulatorRounding.calibrate` recomputes each layer's ``lsbs`` from the calibration
images as the compiler will.

The accumulators are integers: a conv's or linear's float output less its float bias (which
the compiled circuit adds after rounding, in the lookup that follows), divided by its input
quantizer's and its weight's scales, read at every call since learned scales move; an average
pool's sum is its float output times the kernel's size, divided by its input quantizer's scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _sites(encrypted: nn.Module, pools: bool) -> list[tuple[nn.Module, Callable[[], Any]]]:
    """The layers whose accumulators the circuit rounds, in order (registration order is the
    order of computation in both recipes' networks), each with the scale of its integer
    accumulator. The input quantizer of a layer is the last QuantIdentity or QuantReLU before
    it. An average pool right after a conv sums that conv's accumulators: the circuit folds the
    two into one strided conv and rounds the pooled sum, not the conv's."""
    from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU

    sites: list[tuple[nn.Module, Callable[[], Any]]] = []
    quant = previous = None
    for m in encrypted.modules():
        if isinstance(m, (QuantIdentity, QuantReLU)):
            quant = m
        elif isinstance(m, (QuantConv2d, QuantLinear)):
            sites.append((m, lambda q=quant, m=m: q.quant_act_scale() * m.quant_weight_scale()))
        elif isinstance(m, nn.AvgPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
            if isinstance(previous, QuantConv2d):  # pool first: the folded conv's sum
                sites[-1] = (m, lambda conv=sites[-1][1], n=k[0] * k[1]: conv() / n)
            elif pools:
                sites.append((m, lambda q=quant, n=k[0] * k[1]: q.quant_act_scale() / n))
        elif not isinstance(m, nn.BatchNorm2d):
            continue
        previous = m
    return sites


class AccumulatorRounding:
    """Round the accumulators of ``encrypted``'s layers to ``bits`` bits, as the compiled
    circuit will: its first ``skip`` layers are not (the client runs them in the clear), nor
    its last one unless ``round_last`` (an accumulator that is the circuit's output feeds no
    lookup). ``pools``: average pools' sums too (pools of ternary values are never wider than
    4 bits; those of 5-bit activations are). ``calibrate_rounded``: measure each layer's width
    with the layers before it already rounded; the compiler measures them all on the unrounded
    network, which can give one bit fewer in some layers (3 of 9 on a cnv-2w2a trained one
    epoch). The split CNV's ``fast`` builds of non-pool-first archs were trained so, and must
    rebuild to the same bytes; everything else calibrates as the compiler does."""

    def __init__(
        self,
        encrypted: nn.Module,
        bits: int,
        skip: int = 0,
        round_last: bool = True,
        pools: bool = False,
        calibrate_rounded: bool = False,
    ) -> None:
        self.bits, self.skip, self.pools = bits, skip, pools
        self.calibrate_rounded = calibrate_rounded
        self.calibrating = self.active = False
        self.handles: list[Any] = []
        self.count = len(_sites(encrypted, pools)) - skip - (0 if round_last else 1)
        self.lsbs = [0] * self.count

    def attach(self, encrypted: nn.Module) -> None:
        """Round the outputs of ``encrypted``'s layers (a model's, or its weight average's)."""
        sites = _sites(encrypted, self.pools)[self.skip : self.skip + self.count]
        for i, (layer, scale) in enumerate(sites):
            self.handles.append(layer.register_forward_hook(self._hook(i, scale)))

    def _hook(self, i: int, scale_of: Callable[[], Any]):
        from concrete.ml.common.utils import compute_bits_precision

        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            if not self.active:
                return out
            scale = scale_of().detach()
            bias = getattr(module, "bias", None)
            if bias is not None:  # per output channel: NC (linear) or NCHW (conv)
                bias = bias.detach().reshape(1, -1, *[1] * (out.dim() - 2))
                out = out - bias
            acc = torch.round(out / scale)  # an integer, up to float error
            if self.calibrating:
                width = compute_bits_precision(acc.detach().cpu().numpy())
                self.lsbs[i] = max(0, width - self.bits)
            if self.lsbs[i] > 0 and (self.calibrate_rounded or not self.calibrating):
                step = 2.0 ** self.lsbs[i]
                rounded = torch.floor(acc / step + 0.5) * step * scale
                out = out + (rounded - out).detach()  # straight through
            return out if bias is None else out + bias

        return hook

    @torch.no_grad()
    def calibrate(self, run: Callable[[], Any]) -> list[int]:
        """Each layer's ``lsbs`` from one call of ``run``, which passes all the calibration
        images through the attached network at once, in eval mode, as the compiler sees them;
        round from now on. Returns the ``lsbs``."""
        self.calibrating = self.active = True
        try:
            run()
        finally:
            self.calibrating = False
        return list(self.lsbs)

    def detach(self) -> None:
        """Remove the hooks: the networks compute in plain float again."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
