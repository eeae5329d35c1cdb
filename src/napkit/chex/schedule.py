"""When CHEX explores and how much it regrows: the cosine decay of the regrowing factor.

At the start of epoch ``e`` (0-based: ``e`` epochs are done), for ``1 <= e <= T_max`` and
``e % dT == 0``, one exploration step runs with ``d_e = d0 * (1 + cos(pi * e / T_max)) / 2``.
``T_max`` is ``T_max_fraction * epochs`` rounded down to a multiple of ``dT`` and kept below
``epochs`` **[ours]**, so the last step has ``d_e = 0`` and prunes to exactly ``S``. A run too short
for any such epoch explores once, prune-only, at the start of epoch 0 **[ours]**.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from napkit.errors import NapkitError


@dataclass(frozen=True)
class Schedule:
    """Exploration epochs and regrowing factors of one training run."""

    epochs: int
    d0: float
    dT: int
    T_max: int

    @classmethod
    def create(cls, epochs: int, d0: float, dT: int = 2, T_max_fraction: float = 0.72) -> Schedule:
        if epochs < 1:
            raise NapkitError(f"chex needs epochs >= 1, got {epochs}")
        if dT < 1:
            raise NapkitError(f"chex.dT must be >= 1, got {dT}")
        if not 0.0 < T_max_fraction <= 1.0:
            raise NapkitError(f"chex.T_max_fraction must lie in (0, 1], got {T_max_fraction}")
        if d0 < 0:
            raise NapkitError(f"chex.d0 must be >= 0, got {d0}")
        last = min(round(T_max_fraction * epochs), epochs - 1)
        return cls(epochs=epochs, d0=float(d0), dT=int(dT), T_max=max(0, (last // dT) * dT))

    def explores(self, epoch: int) -> bool:
        """Whether an exploration step runs at the start of ``epoch`` (0-based)."""
        if self.T_max == 0:
            return epoch == 0
        return 1 <= epoch <= self.T_max and epoch % self.dT == 0

    def epochs_exploring(self) -> list[int]:
        return [e for e in range(self.epochs) if self.explores(e)]

    def regrow_factor(self, epoch: int) -> float:
        """``d_e``: cosine decay from ``d0`` to exactly 0 at ``T_max``."""
        if self.T_max == 0 or epoch >= self.T_max:
            return 0.0
        return self.d0 * (1.0 + math.cos(math.pi * epoch / self.T_max)) / 2.0

    def frozen_after(self) -> int:
        """First epoch whose masks never change again."""
        return self.T_max
