"""Python face of the native C library (native/*.c, compiled by cffi at install into
a2ats_lite._native). `from a2ats_lite import native; native.X(...)` reaches every wrapper
through the re-exports below; each file holds one role:

    _lib.py        ffi / lib, n_threads_default, simd, the shared argument checks
    quant.py       GGUF weight types: dequantize, matmul_q, the repacked int8 products
    kv_quant.py    KV cache types, their row widths and block quantizer
    gather.py      row gathers (gather_rows, kv_gather, gather_sel) and rowcache_plan
    retrieval.py   build_lut, select_topk, rerank, exact_scores
    fastscan.py    the fast-scan selection of 4-bit codes
    attention.py   dense causal attention and attention over selected rows
"""
from ..errors import NativeError
from ._lib import ffi, lib, n_threads_default, simd
from .attention import attention, sparse_attention
from .fastscan import FS_BLOCK, FS_MAX_M, fastscan_pack, fastscan_quantize_lut, fastscan_select
from .gather import gather_rows, gather_sel, kv_gather, rowcache_plan
from .kv_quant import KV_BLOCKS, KV_TYPES, kv_quantize, kv_row_width, kv_type_of
from .quant import (ACT_KINDS, GGML_TYPES, SUPPORTED_TYPES, Packed, PackedGroup, QRows,
                    dequantize, matmul_packed, matmul_packed_group, matmul_q, quantize_rows,
                    repack, repack_nbytes, type_nbytes)
from .retrieval import build_lut, exact_scores, rerank, select_topk
from . import fused

__all__ = [
    "NativeError", "ffi", "lib", "n_threads_default", "simd",
    "attention", "sparse_attention",
    "FS_BLOCK", "FS_MAX_M", "fastscan_pack", "fastscan_quantize_lut", "fastscan_select",
    "gather_rows", "gather_sel", "kv_gather", "rowcache_plan",
    "KV_BLOCKS", "KV_TYPES", "kv_quantize", "kv_row_width", "kv_type_of",
    "ACT_KINDS", "GGML_TYPES", "SUPPORTED_TYPES", "Packed", "PackedGroup", "QRows",
    "dequantize", "matmul_packed", "matmul_packed_group", "matmul_q", "quantize_rows",
    "repack", "repack_nbytes", "type_nbytes",
    "build_lut", "exact_scores", "rerank", "select_topk",
]
