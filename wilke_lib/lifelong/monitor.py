"""Toxicity recorded while a lifelong run goes (Hu et al. 2024, Sec. 4.1-4.2, Eq. 7).

Toxicity is what an edit followed by its rollback leaves behind (Eq. 7):
    Toxicity = theta* - theta,  f_theta* = KE(KE(f_theta, x_e, y_e), x_e, y_o).
Accumulated over a lifelong run (edit + rollback at every step, Appendix F) it is
W_proj^l(step) - W_proj^l(original) of the recorded layers. `ToxicityMonitor` is the runner's step
callback: it keeps the original W_proj^l, adds ||W^l||_F and ||W^l - W_0^l||_F of every recorded
layer to each step's row (Fig. 3a-6a) and keeps the toxicity matrix, block-averaged, at powers of
two (Fig. 3b-6b).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wilke_lib.arch import ModelAdapter

SNAPSHOT_SIZE = 64


def toxicity(theta_star: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Eq. 7: theta* - theta, the parameters after edit + rollback minus the original ones."""
    return theta_star - theta


def downsample(matrix: torch.Tensor, size: int = SNAPSHOT_SIZE) -> torch.Tensor:
    """Block-average a matrix to at most size x size cells (for the heatmaps of Fig. 3b)."""
    m = torch.as_tensor(matrix, dtype=torch.float32)
    out = (min(size, m.shape[0]), min(size, m.shape[1]))
    return F.adaptive_avg_pool2d(m[None, None].cpu(), out)[0, 0]


def is_snapshot_step(step: int) -> bool:
    """Steps 2, 4, 8, ... (Fig. 3b-6b)."""
    return step >= 2 and step & (step - 1) == 0


class ToxicityMonitor:
    """Per-step toxicity of W_proj at `layers`; create it on the ORIGINAL model (before a resumed
    run's state is restored), so that W_0 is the unedited weight whatever happened before."""

    def __init__(self, model: nn.Module, layers: list[int]) -> None:
        self.adapter = ModelAdapter(model)
        self.layers = list(layers)
        self.original = {l: self.adapter.out_weight(l).detach().float().clone() for l in self.layers}
        self.original_norms = {str(l): float(torch.linalg.norm(w)) for l, w in self.original.items()}

    def row(self) -> dict[str, dict[str, float]]:
        """||W||_F ("layer_norms"), ||W - W_0||_F ("toxicity_norms") and ||W_0||_F ("original_norms")
        of every recorded layer, now."""
        norms, tox = {}, {}
        with torch.no_grad():
            for l in self.layers:
                w = self.adapter.out_weight(l).float()
                norms[str(l)] = float(torch.linalg.norm(w))
                tox[str(l)] = float(torch.linalg.norm(toxicity(w, self.original[l])))
        return {"layer_norms": norms, "toxicity_norms": tox, "original_norms": dict(self.original_norms)}

    def snapshot(self, step: int) -> dict[str, torch.Tensor]:
        """The block-averaged toxicity matrices now, named "step<s>/layer<l>"."""
        with torch.no_grad():
            return {f"step{step}/layer{l}": downsample(toxicity(self.adapter.out_weight(l).float(), self.original[l]))
                    for l in self.layers}
