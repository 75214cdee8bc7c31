"""CUDA-graph replay of fixed-shape model calls: a decode step (``generation``) and a scoring forward (``scoring``).

Why: a forward of ``evo2_1b_base`` over 8,192 tokens is ~47 ms of GPU work and 40-65 ms of host work (megatron's
and Transformer Engine's module wrappers, ~300 Triton launches), so eager scoring at that size waits on the host.
A captured graph is one launch. Capture records without running, so every shape runs eagerly once first: that call
compiles Triton kernels, plans cuFFT transforms and allocates TE workspaces, none of which may happen during capture.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch

logger = logging.getLogger(__name__)

# Forwards of more positions (B x L) run eagerly: their GPU time hides the host's, and a graph holds its forward's
# activation memory for as long as it is kept.
MAX_GRAPH_TOKENS = 65_536


def capture(fn: Callable[[], object], pool=None, generator: torch.Generator | None = None):
    """``(graph, output of fn)`` recorded as a CUDA graph in memory ``pool``, or ``None`` (with a warning) where
    capture fails. ``fn`` must have run eagerly at these shapes before (see the module docstring)."""
    graph = torch.cuda.CUDAGraph()
    try:
        if generator is not None:
            graph.register_generator_state(generator)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side, pool=pool):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
    except Exception as e:  # noqa: BLE001 - any capture failure leaves the (correct) eager path
        logger.warning("CUDA graph capture failed (%s: %s); running eagerly", type(e).__name__, str(e)[:200])
        return None
    return graph, out


class GraphedForward:
    """``model(tokens, positions)`` replayed from a CUDA graph for batch shapes seen before.

    A shape runs eagerly the first time it comes and is captured the second time, so ragged inputs (every batch a
    new length) never pay for a capture, while fixed-size windows - the usual way to score a genome - are replayed
    from then on. At most ``max_graphs`` shapes are kept (least recently used dropped: each holds its forward's
    activation memory), each of at most ``max_tokens`` positions (B x L): longer forwards hide their host time.
    Outputs are copies, never the graph's own buffers, so a later call does not overwrite them.
    """

    def __init__(self, model: torch.nn.Module, max_tokens: int = MAX_GRAPH_TOKENS, max_graphs: int = 2):
        self.model, self.max_tokens, self.max_graphs = model, max_tokens, max_graphs
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()  # shape -> (graph, tokens, positions, output)
        self._seen: set[tuple] = set()
        self._failed: set[tuple] = set()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, **options) -> torch.Tensor:
        """``model(tokens, positions, **options)``; ``options`` (e.g. ``hidden_layer=k``) are part of the shape key."""
        key = (tuple(tokens.shape), tokens.device, tuple(sorted(options.items())))
        if key in self._graphs:
            self._graphs.move_to_end(key)
            graph, static_tokens, static_positions, out = self._graphs[key]
            static_tokens.copy_(tokens)
            static_positions.copy_(positions)
            graph.replay()
            return out.clone()
        eager = (tokens.device.type != "cuda" or tokens.numel() > self.max_tokens or key in self._failed
                 or key not in self._seen or torch.is_grad_enabled())
        if eager:
            self._seen.add(key)
            return self.model(tokens, positions, **options)
        static_tokens, static_positions = tokens.clone(), positions.clone()
        captured = capture(lambda: self.model(static_tokens, static_positions, **options))
        if captured is None:
            self._failed.add(key)
            return self.model(tokens, positions, **options)
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        self._graphs[key] = (captured[0], static_tokens, static_positions, captured[1])
        logger.debug("captured the forward for batch shape %s %s as a CUDA graph", key[0], options or "")
        return self(tokens, positions, **options)
