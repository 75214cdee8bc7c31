"""Strict reading of a source state dict: every tensor is either mapped or explicitly ignored, else an error."""

from __future__ import annotations

import re

import torch


class StrictSource:
    """Wraps a flat state dict; ``take`` marks keys used, ``finish`` refuses any key neither used nor ignored."""

    def __init__(self, state: dict[str, torch.Tensor], *, what: str, ignored: re.Pattern | None = None,
                 hint: str = ""):
        self.state, self.what, self.ignored, self.hint = state, what, ignored, hint
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise KeyError(f"{self.what} lacks {key!r}{self.hint}")
        self.used.add(key)
        return self.state[key]

    def finish(self) -> None:
        stray = sorted(k for k in self.state
                       if k not in self.used and not (self.ignored is not None and self.ignored.search(k)))
        if stray:
            raise ValueError(f"{self.what} has {len(stray)} tensor(s) with no Megatron-Bridge counterpart: "
                             f"{stray[:10]}; is --model-size right, or is the file from another model?")
