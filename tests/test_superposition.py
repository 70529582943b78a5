"""Knowledge superposition (Hu et al. 2024b, arXiv 2408.07413): the P matrix, whitened angles and the
statistics chapter 11 reports, on hand-built keys and covariances."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wilke_lib.analysis.superposition import auc, excess_kurtosis, p_matrix, spearman, whitened_angles


def test_p_matrix_on_hand_built_keys():
    keys = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    c_inv = torch.diag(torch.tensor([1.0, 4.0]))
    # k_i^T C^-1 k_j: [[1, 1, 0], [1, 5, 8], [0, 8, 16]]; P[i, j] = that / (k_i^T C^-1 k_i)
    expected = torch.tensor([[math.nan, 1.0, 0.0], [0.2, math.nan, 1.6], [0.0, 0.5, math.nan]], dtype=torch.float64)
    P = p_matrix(keys, c_inv)
    assert torch.isnan(P.diagonal()).all()  # the diagonal (each edit's own key) is dropped
    torch.testing.assert_close(P, expected, equal_nan=True)


def test_orthogonal_whitened_keys_do_not_interfere():
    c = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    # keys whose whitened images C^-1/2 k are orthogonal: k = C^1/2 e_i
    eigvals, eigvecs = torch.linalg.eigh(c.double())
    root = eigvecs @ torch.diag(eigvals.sqrt()) @ eigvecs.T
    keys = root.T.contiguous()  # rows C^1/2 e_1, C^1/2 e_2 (C^1/2 is symmetric)
    P = p_matrix(keys, torch.linalg.inv(c.double()))
    assert abs(P[0, 1].item()) < 1e-10 and abs(P[1, 0].item()) < 1e-10
    torch.testing.assert_close(whitened_angles(keys, c), torch.full((2,), 90.0, dtype=torch.float64))


def test_statistics():
    rng = np.random.default_rng(0)
    assert abs(excess_kurtosis(rng.normal(size=200_000))) < 0.05  # normal: 0
    assert excess_kurtosis(rng.laplace(size=200_000)) == pytest.approx(3.0, abs=0.2)  # Laplace: 3
    assert excess_kurtosis(np.array([1.0, math.nan, 2.0, 3.0, 4.0])) == pytest.approx(-1.36)  # NaN ignored
    assert spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert math.isnan(auc([0.1, 0.2], [True, True]))
