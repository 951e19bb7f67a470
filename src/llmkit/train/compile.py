"""`train.compile: true`: the model's forward and backward under `torch.compile` (TorchInductor).

Only the module is compiled; the loss function, clipping and the optimizer step stay eager, so
every loss_fn, callback and checkpoint works unchanged (the compiled wrapper shares the module's
parameters). Compilation happens lazily: the first training step traces and compiles the forward
and the backward, the first evaluation compiles the eval/no-grad variant. `CompileClock` adds up
the seconds spent compiling (dynamo's compile-start/-end callbacks, which also cover a deferred
backward compile), so a run can report its compile time apart from its step time.
"""
from __future__ import annotations

import time

import torch
from torch import nn


def compile_module(module: nn.Module) -> nn.Module:
    """torch.compile(module) with the default Inductor backend."""
    return torch.compile(module)


class CompileClock:
    """Seconds spent inside torch.compile since `start()`, summed over every (re)compilation."""

    def __init__(self):
        self.seconds, self.compiles = 0.0, 0
        self._began = self._handler = None

    def _on_start(self, _args) -> None:
        self._began = time.perf_counter()

    def _on_end(self, _args) -> None:
        if self._began is not None:
            self.seconds += time.perf_counter() - self._began
            self.compiles += 1
            self._began = None

    def start(self) -> "CompileClock":
        try:  # a private API of torch._dynamo: without it the compile time is simply not reported
            from torch._dynamo.callback import callback_handler
        except ImportError:
            return self
        callback_handler.register_start_callback(self._on_start)
        callback_handler.register_end_callback(self._on_end)
        self._handler = callback_handler
        return self

    def stop(self) -> None:
        if self._handler is not None:
            self._handler.remove_start_callback(self._on_start)
            self._handler.remove_end_callback(self._on_end)
            self._handler = None
