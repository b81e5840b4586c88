"""Memory engine: fp8 base weights, block swap, activation offload, placement, per-block compile.

See docs/memory.md for how the pieces work together and which settings fit which GPU.
"""

from .block_swap import BlockSwapConfig, BlockSwapper, choose_swapped, swap_blocks, validate_blocks_to_swap
from .checkpointing import set_block_checkpointing
from .compile import CompileConfig, CompileReport, compile_blocks, uncompile_blocks
from .fp8 import (DEFAULT_BLOCK_SIZE, FP8_DTYPE, Fp8Linear, dequantize_weight,
                  enable_fp8_matmul, fp8_matmul_supported, fp8_summary, is_fp8_target, load_fp8_checkpoint,
                  load_fp8_linears, quantize_model_fp8, quantize_weight, set_fp8_scale_dtype)
from .offload import OffloadStats, checkpoint_block, offload_saved_tensors
from .placement import (bytes_to_move, estimate_module_bytes, module_device, move_to, offload_after_use,
                        request_room, set_before_move_hook)
from .transfer import (CudaTransfer, FakeTransfer, Transfer, default_transfer, pinned_bytes_in_use,
                       release_pinned_cache)

__all__ = [
    "BlockSwapConfig", "BlockSwapper", "choose_swapped", "swap_blocks", "validate_blocks_to_swap",
    "set_block_checkpointing",
    "CompileConfig", "CompileReport", "compile_blocks", "uncompile_blocks",
    "DEFAULT_BLOCK_SIZE", "FP8_DTYPE", "Fp8Linear", "dequantize_weight",
    "enable_fp8_matmul", "fp8_matmul_supported", "fp8_summary", "is_fp8_target", "load_fp8_checkpoint",
    "load_fp8_linears", "quantize_model_fp8", "quantize_weight", "set_fp8_scale_dtype",
    "OffloadStats", "checkpoint_block", "offload_saved_tensors",
    "bytes_to_move", "estimate_module_bytes", "module_device", "move_to", "offload_after_use", "request_room",
    "set_before_move_hook",
    "CudaTransfer", "FakeTransfer", "Transfer", "default_transfer", "pinned_bytes_in_use", "release_pinned_cache",
]
