"""Verdict tables: what the paper reports beside what a model shows, and whether it is observed."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd


def verdict_table(rows: Sequence[tuple[str, str, str, bool | None]]) -> pd.DataFrame:
    """A comparison table: (phenomenon, what the paper reports, what the organism shows, observed?)."""
    def word(flag: bool | None) -> str:
        return "n/a" if flag is None else ("yes" if flag else "no")

    return pd.DataFrame([{"phenomenon": p, "paper": paper, "this model": ours, "observed": word(flag)}
                         for p, paper, ours, flag in rows])


def verdict_sentence(table: pd.DataFrame, subject: str = "This model") -> str:
    """One Markdown paragraph from a `verdict_table`: what is observed, what is not, what is n/a."""
    parts = []
    for word, label in (("yes", "shows"), ("no", "does not show"), ("n/a", "cannot be checked for")):
        items = table.loc[table["observed"] == word, "phenomenon"].tolist()
        if items:
            parts.append(f"{label} " + "; ".join(f"*{p}*" for p in items))
    return f"{subject} " + ", and ".join(parts) + "." if parts else ""


def empty_groups() -> pd.DataFrame:
    """The verdict when one of the compared groups has no record."""
    return verdict_table([("flash vs normal", "-", "one of the groups is empty", None)])
