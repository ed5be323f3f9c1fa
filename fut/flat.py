"""Parameters as one flat float32 vector: the space the cache and the estimators work in."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> "ParamLayout":
        return cls(tuple(tensors), tuple(t.shape for t in tensors.values()))

    @property
    def dim(self) -> int:
        return sum(s.numel() for s in self.shapes)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1).float() for n in self.names])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            out[n] = vec[i: i + s.numel()].view(s)
            i += s.numel()
        return out
