"""What the paper reports, as data frames: Table 1 and the curves behind it (`wilke_lib/data/`).

Low in the layers (results-level: pandas only), so that the analyses compare with the paper without the
book's helpers; `book.paper_table1` and `book.paper_curves` are these functions.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

DATA_DIR: Path = Path(__file__).resolve().parent / "data"


def paper_table1() -> pd.DataFrame:
    """Table 1 of Hu et al. (2024) as reported (%, 95% CI in ``*_ci``), as a pandas DataFrame."""
    return pd.read_csv(DATA_DIR / "table1_reported.csv")


def paper_curves() -> pd.DataFrame:
    """The authors' curves behind Table 1 and Fig. 43 (from their released summary notebooks): one row per
    model, editor, checkpoint (1, 2, 4, ..., 1024) and metric, with the mean and np.std over their three
    runs, as fractions."""
    return pd.read_csv(DATA_DIR / "curves_reported.csv")
