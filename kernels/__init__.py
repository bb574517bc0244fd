"""Triton kernels of bagel-rt. Each public launcher has a plain-PyTorch ``*_ref`` twin with the same signature."""

from .attention import varlen_attention, varlen_attention_ref
from .cfg_euler import cfg_euler, cfg_euler_ref
from .fp8_quant import quantize_rows_fp8, quantize_rows_fp8_ref
from .gemv import gemv, gemv_ref, gemv_swiglu, gemv_swiglu_ref
from .int8_quant import quantize_rows_int8, quantize_rows_int8_ref
from .qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from .qkv_rope_cache import qkv_rope_cache, qkv_rope_cache_ref
from .rms_norm import (
    add_rms_norm,
    add_rms_norm_fp8,
    add_rms_norm_fp8_ref,
    add_rms_norm_parts,
    add_rms_norm_parts_ref,
    add_rms_norm_ref,
    rms_norm,
    rms_norm_fp8,
    rms_norm_fp8_ref,
    rms_norm_ref,
)
from .swiglu import swiglu, swiglu_fp8, swiglu_fp8_ref, swiglu_ref

__all__ = [
    "add_rms_norm",
    "add_rms_norm_fp8",
    "add_rms_norm_fp8_ref",
    "add_rms_norm_parts",
    "add_rms_norm_parts_ref",
    "add_rms_norm_ref",
    "cfg_euler",
    "cfg_euler_ref",
    "gemv",
    "gemv_ref",
    "gemv_swiglu",
    "gemv_swiglu_ref",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "qkv_rope_cache",
    "qkv_rope_cache_ref",
    "quantize_rows_fp8",
    "quantize_rows_fp8_ref",
    "quantize_rows_int8",
    "quantize_rows_int8_ref",
    "rms_norm",
    "rms_norm_fp8",
    "rms_norm_fp8_ref",
    "rms_norm_ref",
    "swiglu",
    "swiglu_fp8",
    "swiglu_fp8_ref",
    "swiglu_ref",
    "varlen_attention",
    "varlen_attention_ref",
]
