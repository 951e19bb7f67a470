"""The layer-by-layer calibration driver of GPTQ, SparseGPT, Wanda and structured pruning.

As in the reference implementations of GPTQ (Frantar et al. 2023) and SparseGPT / Wanda
(Frantar & Alistarh 2023; Sun et al. 2024), a model is compressed one block at a time:

1. the calibration ids (N, T) run through the model until block 0, whose inputs and keyword
   arguments (mask, is_causal, rope, memory, ...) are recorded per micro-batch — a forward
   pre-hook raises a private exception there, so nothing after the embeddings runs;
2. for block i: hooks on the inputs of the block's Linears (targets.block_linears) feed one
   statistic accumulator each while the block runs on the recorded inputs; the method then
   changes the block's weights (`update`);
3. the CHANGED block runs again on the same inputs, and its outputs are block i+1's inputs, so
   every block is calibrated on what the already-compressed blocks before it produce.

All Linears of a block take their statistics from the same pass over the block's inputs (before
any of them is changed), the default of the GPTQ and SparseGPT reference code (GPTQ's
`--true-sequential`, which re-runs between sublayers, is not done here).

Memory: the hidden states of all N sequences are kept (N·T·d floats, as the references keep
`inps`); the block runs on `chunk_size` sequences at a time, so activations stay bounded.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
from torch import nn

from ..model.modes import evaluating
from .errors import CompressError
from .targets import block_linears


class Accumulator(Protocol):
    def add(self, x: torch.Tensor) -> None:
        """Take one micro-batch of a Linear's inputs (..., in)."""


# observe(path, linear) -> an accumulator for that Linear's inputs, or None to leave it alone.
Observe = Callable[[str, nn.Linear], Optional[Accumulator]]
# update(block_index, block, {path: (linear, accumulator)}) changes the block's weights in place.
Update = Callable[[int, nn.Module, dict], None]


class _Stop(Exception):
    """Raised by the block-0 hook: the embeddings have run, the rest of the model need not."""


def check_calibration(calibration, where: str) -> torch.Tensor:
    """Calibration token ids: a 2-D integer tensor (N, T) with N, T >= 1."""
    if calibration is None:
        raise CompressError(f"{where}: calibration=None: expected token ids, a LongTensor (N, T)")
    if (not isinstance(calibration, torch.Tensor) or calibration.dim() != 2
            or calibration.dtype in (torch.bool,) or calibration.is_floating_point() or calibration.is_complex()
            or calibration.numel() == 0):
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise CompressError(f"{where}: calibration={shape}: expected token ids, a non-empty integer tensor (N, T)")
    return calibration.long()


def capture_block_inputs(model: nn.Module, calibration: torch.Tensor, chunk_size: int = 8
                         ) -> list[tuple[torch.Tensor, dict]]:
    """Block 0's input hidden states and keyword arguments, one (x (B, T, d), kwargs) per micro-batch."""
    blocks = model.blocks()
    if any(getattr(b, "cross_attn", None) is not None for b in blocks):
        raise CompressError(f"calibration: model={type(model).__name__}: its decoder blocks take the encoder's "
                            "states, not the block before; expected a decoder-only or encoder model")
    device = next(model.parameters()).device
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args[0], dict(kwargs)))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in calibration.split(chunk_size):
            try:
                model(ids.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, index: int, batches: list[tuple[torch.Tensor, dict]]) -> list:
    """The block's outputs on every recorded micro-batch (its `layer` argument set to its index)."""
    return [(block(x, **{**kwargs, "layer": index}), kwargs) for x, kwargs in batches]


def layerwise(model: nn.Module, calibration: torch.Tensor, observe: Observe, update: Update, *,
              chunk_size: int = 8, progress: bool = True, desc: str = "compress") -> None:
    """Drive `observe` / `update` block by block (module docstring), in eval mode, without grad."""
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise CompressError(f"calibration: chunk_size={chunk_size!r}: expected a positive integer")
    from tqdm import tqdm                                   # lazy: only the drivers need it

    paths = {id(m): name for name, m in model.named_modules()}
    with evaluating(model):
        batches = capture_block_inputs(model, calibration, chunk_size)
        blocks = model.blocks()
        for i, block in enumerate(tqdm(blocks, desc=desc, unit="block", disable=not progress)):
            stats, handles = {}, []
            for path, linear in block_linears(block, prefix=paths[id(block)] + ".").items():
                acc = observe(path, linear)
                if acc is not None:
                    stats[path] = (linear, acc)
                    handles.append(linear.register_forward_pre_hook(
                        lambda mod, args, acc=acc: acc.add(args[0].detach())))
            try:
                if stats:
                    run_block(block, i, batches)
            finally:
                for h in handles:
                    h.remove()
            update(i, block, stats)
            if i + 1 < len(blocks):
                batches = run_block(block, i, batches)      # the changed block feeds the next one
