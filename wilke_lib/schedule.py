"""When a lifelong run measures ERS and ORS: `CheckpointPolicy` and `checkpoint_steps`.

Import-light (no torch): the run-size profiles (`profiles`) hold a policy, and `lifelong.config` puts it in
a run's identity (by the class's name and fields, `results.plain`, so it does not depend on this module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CheckpointPolicy", "checkpoint_steps"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When ERS / ORS are measured: powers of two, multiples of `multiple_of`, the last step."""

    powers_of_two: bool = True
    multiple_of: int | None = 50
    include_last: bool = True
    extra: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.multiple_of is not None and (not _is_int(self.multiple_of) or self.multiple_of < 1):
            raise ValueError(f"CheckpointPolicy.multiple_of must be an int >= 1 or None, got {self.multiple_of!r}")
        if not all(_is_int(s) and s >= 1 for s in self.extra):
            raise ValueError(f"CheckpointPolicy.extra must be steps (ints >= 1), got {self.extra!r}")

    def is_checkpoint(self, step: int, n_edits: int) -> bool:
        """Whether ERS / ORS are measured after step `step` (1-based) of `n_edits`."""
        if step < 1 or step > n_edits:
            return False
        return ((self.powers_of_two and step & (step - 1) == 0)
                or (self.multiple_of is not None and step % self.multiple_of == 0)
                or (self.include_last and step == n_edits)
                or step in self.extra)


def checkpoint_steps(n_edits: int, policy: CheckpointPolicy | None = None) -> list[int]:
    """All checkpoint steps (1-based, increasing) of a run of `n_edits` edits."""
    policy = policy or CheckpointPolicy()
    return [s for s in range(1, n_edits + 1) if policy.is_checkpoint(s, n_edits)]
