"""Triton kernels for smoe_fast (import name ``smoe_fast.kernels``; importing it imports triton).

The triton backend: the same four functions, with the same signatures, as smoe_fast/reference.py.

| module          | op                | what runs                                                        |
|-----------------|-------------------|------------------------------------------------------------------|
| grouping.py     | group_by_expert   | counting sort of [B] / [B,K] assignments by expert               |
| experts_hard.py | experts_hard      | top-1 inference: one fused decoder kernel per call (every kind)  |
| lite_folded.py  | (hard lite)       | lite's fc folded into conv1 (an [L, 14x128] GEMM per row) and conv2 as banded GEMMs, on tensor cores in TF32/half modes |
| experts_soft.py | experts_soft      | soft-gated training: fused forward over (token block, expert group) items, recomputing backward; nothing of size B x E kept but the gates |
| experts_topk.py | experts_topk      | top-k training over the grouped [B,K] assignments                |
| experts_medium.py, grouped_layers.py | (medium) | soft/top-k training of "medium" experts layer by layer |
| decoder_tiles.py, decoder_tiles_bwd.py | | one expert's conv decoder on a tile: forward (hard, soft, top-k), backward (soft, top-k) |
| decoder_blocks.py, tuning.py | | the mlp training bodies, soft grid splits, partial-gradient layouts; block sizes per (kind, dtype, GPU, bucketed B) |
"""
from .experts_hard import experts_hard
from .experts_soft import experts_soft
from .experts_topk import experts_topk
from .grouping import group_by_expert

__all__ = ["group_by_expert", "experts_hard", "experts_soft", "experts_topk"]
