"""A faster forward for PEFT's LoRA linear layers: the same adapter, the same numbers.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. The adapter's product
lands in a new ``[tokens, out]`` tensor, is scaled into another and added into a third,
and the backward pass scales the incoming ``[tokens, out]`` gradient once more. On a
small model, where the rank is not small next to the width, those passes over
``[tokens, out]`` cost about as much as the adapter's matmuls. ``FusedLoraLinear`` adds
the product into the base layer's output, in place, inside one ``addmm_`` with ``alpha =
scaling``: no extra ``[tokens, out]`` tensor in the forward, and the scaling falls on the
``[tokens, r]`` side in the backward.

The layer stays peft's own (``isinstance(layer, peft.tuners.lora.Linear)`` holds, the
state dict and the saved adapter are unchanged); only the forward of the common case is
replaced. Anything else (adapters disabled or merged, several active adapters, DoRA and
other variants, a LoRA bias, mixed dtypes, extra forward arguments) runs peft's forward.
In fp32 the result equals peft's to rounding; in bf16 it rounds once where peft rounds the
product, the scaling and the sum. The fused path reads the ``lora_A``/``lora_B`` weights
directly, so hooks on those two submodules do not run (looper puts none there; FSDP2 wraps
whole decoder layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear

__all__ = ["FusedLoraLinear", "fuse_lora_linears"]


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA ``Linear`` whose single-adapter forward is one ``addmm_`` (see the module)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        flat = x.reshape(-1, x.shape[-1])
        # In place: the base output is not saved by anything autograd needs (a linear layer's
        # backward keeps its input and weight), so it can take the product directly. It is
        # computed 2-D, so it is not a view: an in-place op on a view would make autograd
        # copy the whole gradient of its base in the backward pass.
        out = self.base_layer(flat)
        out.addmm_(F.linear(self.lora_dropout[name](flat), lora_a), lora_b.t(), alpha=self.scaling[name])
        return out.view(*x.shape[:-1], out.shape[-1])

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict):
        """The one active adapter when the fused path computes what peft's forward would; else None."""
        if args or kwargs or self.disable_adapters or self.merged or x.dim() < 2:
            return None
        active = self.active_adapters
        if len(active) != 1:
            return None
        name = active[0]
        if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        base = self.base_layer
        if type(base) is not torch.nn.Linear:  # a quantized or otherwise unusual base layer
            return None
        if not x.dtype == base.weight.dtype == self.lora_A[name].weight.dtype == self.lora_B[name].weight.dtype:
            return None
        if not isinstance(self.scaling[name], (int, float)):
            return None
        return name


def fuse_lora_linears(model: torch.nn.Module) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the fused forward, in place; returns how
    many layers changed. Layers of peft's other LoRA types are left as they are."""
    n = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            n += 1
    return n
