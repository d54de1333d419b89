"""``--dtype int8`` on a CPU: a CLIP model's linear layers quantized to int8 once, at load.

torch's own ``quantize_dynamic`` (weights int8 per output channel, activations scaled per
minibatch), not torchao's ``Int8DynamicActivationInt8WeightConfig``: in eager mode on CPU torchao's
ran a ViT-B-32 at 0.3 images/s (it needs torch.compile), torch's fbgemm/x86 kernels at 1.6-1.8x
fp32. torch marks the API deprecated but ships and runs it (2.14).

Two choices beyond "quantize every ``nn.Linear``", measured on a random ViT-B-32 and mini::shapes
(``bench/dtype.py``, ``python -m clip_search.demo_model.evaluate``):

- ``nn.MultiheadAttention`` keeps its input projection in a raw parameter that torch does not
  quantize, a third of the linear work: :class:`LinearSelfAttention` computes the same attention
  with ``nn.Linear`` projections, which raised ViT-B-32 from 1.45x to 1.8x fp32.
- The first block of each transformer reads the patch (or token) embeddings, whose outliers
  per-minibatch scaling serves worst: kept in fp32, mini::shapes' lowest image cosine to fp32
  rose from 0.992 to 0.999, for about a tenth of ViT-B-32's gain.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its linear layers, attention projections included, in dynamic int8 (CPU)."""
    use_linear_attention(model)
    kept = tuple(f'{name}.resblocks.0.' for name, module in model.named_modules() if _is_transformer(module))
    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and not f'{name}.'.startswith(kept)
    }
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        warnings.filterwarnings('ignore', message='.*quantize_per_(tensor|channel).*')
        model = quantize_dynamic(model, spec, dtype=torch.qint8)
    for module in model.modules():
        if isinstance(module, DynamicInt8Linear):
            # open_clip's hook for int8 layers: Transformer.get_cast_dtype() reads it (a quantized .weight is a method)
            module.int8_original_dtype = torch.float32
    return model


def use_linear_attention(model: torch.nn.Module) -> None:
    """Replace every self-attention ``nn.MultiheadAttention`` it can by :class:`LinearSelfAttention`, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.MultiheadAttention) and LinearSelfAttention.can_replace(child):
                setattr(parent, name, LinearSelfAttention(child))


class LinearSelfAttention(torch.nn.Module):
    """``nn.MultiheadAttention`` (batch first, self-attention, no extra bias, no dropout) with its
    projections as ``nn.Linear`` layers, which dynamic quantization converts; the same outputs in fp32."""

    @staticmethod
    def can_replace(attention: torch.nn.MultiheadAttention) -> bool:
        return bool(
            attention.batch_first
            and attention._qkv_same_embed_dim
            and attention.bias_k is None
            and not attention.add_zero_attn
            and attention.dropout == 0.0
        )

    def __init__(self, attention: torch.nn.MultiheadAttention):
        super().__init__()
        width = attention.embed_dim
        self.num_heads = attention.num_heads
        self.in_proj = torch.nn.Linear(width, 3 * width, bias=attention.in_proj_bias is not None)
        self.out_proj = torch.nn.Linear(width, width, bias=attention.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(attention.in_proj_weight)
            self.out_proj.weight.copy_(attention.out_proj.weight)
            if attention.in_proj_bias is not None:
                self.in_proj.bias.copy_(attention.in_proj_bias)
            if attention.out_proj.bias is not None:
                self.out_proj.bias.copy_(attention.out_proj.bias)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, key_padding_mask=None):
        """open_clip's call, ``attn(x, x, x, need_weights=False, attn_mask=mask)``: (output, None)."""
        if any(other is not None and other is not query for other in (key, value)) or key_padding_mask is not None:
            raise ValueError('LinearSelfAttention computes self-attention only, without a key padding mask')
        batch, length, width = query.shape
        heads = self.in_proj(query).view(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = heads.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width)), None


def _is_transformer(module: torch.nn.Module) -> bool:
    """open_clip's ``Transformer`` (and towers built like it): a ``resblocks`` list of blocks."""
    return isinstance(getattr(module, 'resblocks', None), torch.nn.ModuleList)
