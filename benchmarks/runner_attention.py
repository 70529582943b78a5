#!/usr/bin/env python
"""The block runner's attention on a CPU: explicit operations against `scaled_dot_product_attention`.

`fast_blocks._attend_explicitly` computes softmax(q k^T * scale + mask) v in three operations on a
CPU. This benchmark times, in one process and interleaved per record (the order alternating, so that
a machine's drift hits every variant alike), ROME's delta optimisation (`rome.compute_v`, ROME Eq. 4)
on the block runner with each attention and on the released code's path (whole prompts through the
modules), and WilKE's batched layer search with each attention. It prints the medians and writes
`benchmarks/results/<device>/runner_attention_<model>.csv` (one row per record and variant).

    python benchmarks/runner_attention.py                     # both organisms, 12 records
    python benchmarks/runner_attention.py --models toy-gpt2 --records 6
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from contextlib import nullcontext
from unittest import mock

import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wilke_lib import counterfact, models  # noqa: E402
from wilke_lib.bench import editors as bm  # noqa: E402
from wilke_lib.editing import EditCache  # noqa: E402
from wilke_lib.editors import fast_blocks, rome, wilke  # noqa: E402
from wilke_lib.editors.delta import compute_keys  # noqa: E402


def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def time_model(model_name: str, n_records: int) -> pd.DataFrame:
    model, tok = models.load_model(model_name)
    records = counterfact.load_counterfact("toy-world")[: n_records + 1]  # the first one warms up
    hps = bm.aligned_hparams(model_name)
    rome_hp, wilke_hp = hps["rome"], hps["wilke"]
    released = dataclasses.replace(rome_hp, delta_runner="full")
    cache = EditCache.for_model(model)
    prefixes = cache.get_prefixes(model, tok, rome_hp)
    rows = []
    for n, record in enumerate(records):
        request = record["requested_rewrite"]
        keys = compute_keys(model, tok, request, [rome_hp.layer], rome_hp, prefixes)[rome_hp.layer]
        variants = [
            ("ROME optimisation", "explicit", rome_hp, None),
            ("ROME optimisation", "sdpa", rome_hp, _sdpa),
            ("ROME optimisation", "released path", released, None),
            ("WilKE batched search", "explicit", wilke_hp, None),
            ("WilKE batched search", "sdpa", wilke_hp, _sdpa),
        ]
        for what, attention, hp, patch in (variants if n % 2 else variants[::-1]):
            patched = mock.patch.object(fast_blocks, "_attend_explicitly", patch) if patch else nullcontext()
            with patched:
                start = time.perf_counter()
                if what.startswith("ROME"):
                    rome.compute_v(model, tok, request, hp.layer, keys, hp, prefixes)
                else:
                    wilke.batched_layer_scores(model, tok, request, hp, cache)
                seconds = time.perf_counter() - start
            if n:
                rows.append({"model": model_name, "what": what, "attention": attention, "case_id": record["case_id"],
                             "ms": 1000 * seconds})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(models.ORGANISMS))
    parser.add_argument("--records", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = bm.results_dir("cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    for model_name in args.models:
        rows = time_model(model_name, args.records)
        rows.to_csv(out_dir / f"runner_attention_{Path(model_name).name}.csv", index=False)
        medians = rows.groupby(["what", "attention"])["ms"].median().round(1)
        print(f"{model_name} ({args.records} records, {args.threads} threads, median ms):")
        print(medians.to_string())
        rome_ms = medians["ROME optimisation"]
        print(f"  ROME optimisation vs the released path: explicit {rome_ms['released path'] / rome_ms['explicit']:.2f}x, "
              f"sdpa {rome_ms['released path'] / rome_ms['sdpa']:.2f}x (target on CPU >= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
