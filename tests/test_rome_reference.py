"""ROME's update against frozen reference numbers (issue 33).

One fixed edit (request, hyper-parameters, context prefixes) on a committed 3-layer GPT-2 of d_model 16
(`tests/data/rome_reference/`: weights, tokenizer and the corpus of its second moments; see its
README.md). The numbers were computed with the code of commit a986ff0 and are unchanged, bit for bit, by
the one Eq. 4 loop over three runners (52c6ed4): any change of ROME's numbers, however small, shows here.

* The floats (the update's norm, its four largest entries, the norms the editor reports) are compared
  with rtol 1e-5 on every platform. Measured on the freezing machine, float rounding moves them by at
  most 4.4e-6 relative: forcing torch's kernels to AVX2 or to no vectorisation
  (ATEN_CPU_CAPABILITY=avx2 / default), or using the "full" delta runner instead of "prefix-cache".
* The sha256 of the update's bytes is compared exactly only on the freezing platform (same torch, same
  CPU model, same kernel capability, one torch thread as tests/conftest.py sets): the bytes are not
  portable. The hash changed with each of the three perturbations above, and with 2 torch threads
  instead of 1.

When a change of the numbers is intended, run this file with WILKE_PRINT_REFERENCE=1 and -s: it prints
the new values to paste below (and say why they changed in the commit message).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from wilke_lib.editing import EditCache, edit
from wilke_lib.hparams import ROMEHParams

DATA = Path(__file__).resolve().parent / "data" / "rome_reference"
REQUEST = {"prompt": "The mother tongue of {} is", "subject": "Mira Quell",
           "target_new": {"str": "French", "id": "Q150"}, "target_true": {"str": "Welsh", "id": "Q9309"}}
MODULE = "transformer.h.1.mlp.c_proj"
RTOL = 1e-5


def reference_hparams(**changes) -> ROMEHParams:
    """ROME at layer 1 with fixed prefixes, 10 Adam steps and C from the committed corpus; every other
    setting the default (the default delta runner included: the reference guards what users get)."""
    return ROMEHParams(layer=1, context_prefixes=["Alpha beta gamma. ", "The delta. "], v_num_grad_steps=10,
                       mom2_corpus=str(DATA / "corpus.txt"), mom2_n_samples=200, mom2_batch_size=64, **changes)


FROZEN = {
    "shape": [16, 64],
    "norm": 1.3731087198975787,  # Frobenius norm of dW
    "entries": {114: -0.25131508708000183, 178: -0.23983332514762878,  # the four largest |dW|, flat index
                498: 0.23816606402397156, 78: 0.22810624539852142},
    "info": {"delta_norm": 0.6147719621658325, "k_star_norm": 2.522585391998291, "v_star_norm": 3.603151559829712,
             "v0_norm": 3.3238625526428223},
}
FROZEN_SHA256 = "b968d5c35cb0d9db78ba21f5079a6b8d5824c347dcd398da409dc6f8f626e6a6"
FROZEN_PLATFORM = {"torch": "2.13.0+cpu", "machine": "x86_64", "cpu": "Intel(R) Xeon(R) Processor @ 2.80GHz",
                   "capability": "AVX512", "threads": 1}


def this_platform() -> dict:
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu": cpu,
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


@pytest.fixture(scope="module")
def reference_model():
    model = GPT2LMHeadModel.from_pretrained(DATA).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(DATA / "tokenizer.json"), eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", pad_token="<pad>")
    return model, tok


def reference_edit(reference_model, tmp_path: Path, **changes) -> tuple[torch.Tensor, dict]:
    model, tok = reference_model
    cache = EditCache.for_model(model, stats_dir=tmp_path / "stats")
    result = edit(model, tok, REQUEST, reference_hparams(**changes), cache=cache, copy=True)
    assert list(result.weight_deltas) == [MODULE]
    dW = result.weight_deltas[MODULE]
    if os.environ.get("WILKE_PRINT_REFERENCE"):
        flat = dW.flatten()
        top = flat.abs().argsort(descending=True)[:4].tolist()
        print(json.dumps({"changes": changes, "norm": float(dW.double().norm()),
                          "entries": {i: float(flat[i]) for i in top},
                          "info": {k: result.info[k] for k in FROZEN["info"]},
                          "sha256": hashlib.sha256(dW.contiguous().numpy().tobytes()).hexdigest(),
                          "platform": this_platform()}))
    return dW, result.info


def test_the_committed_model_is_the_one_frozen():
    """The reference data is what the README describes (a changed file would change every number)."""
    digests = {name: hashlib.sha256((DATA / name).read_bytes()).hexdigest()[:16]
               for name in ("model.safetensors", "tokenizer.json", "corpus.txt")}
    assert digests == {"model.safetensors": "e60f6449a10e6bb3", "tokenizer.json": "34852352963cc921",
                       "corpus.txt": "75348906e62ddeae"}


@pytest.mark.parametrize("runner", [None, "full"], ids=["default runner", "full runner"])
def test_rome_update_matches_the_frozen_floats(runner, reference_model, tmp_path):
    dW, info = reference_edit(reference_model, tmp_path, **({"delta_runner": runner} if runner else {}))
    assert list(dW.shape) == FROZEN["shape"] and dW.dtype == torch.float32
    assert float(dW.double().norm()) == pytest.approx(FROZEN["norm"], rel=RTOL)
    flat = dW.flatten()
    assert set(flat.abs().argsort(descending=True)[:4].tolist()) == set(FROZEN["entries"])
    for index, value in FROZEN["entries"].items():
        assert float(flat[index]) == pytest.approx(value, rel=RTOL), index
    for key, value in FROZEN["info"].items():
        assert info[key] == pytest.approx(value, rel=RTOL), key
    assert info["steps"] == 10


def test_rome_update_matches_the_frozen_bytes_on_the_freezing_platform(reference_model, tmp_path):
    here = this_platform()
    if here != FROZEN_PLATFORM:
        differ = {k: (here[k], FROZEN_PLATFORM[k]) for k in here if here[k] != FROZEN_PLATFORM[k]}
        pytest.skip(f"the exact bytes are only comparable on the freezing platform; here (vs frozen): {differ}")
    dW, _ = reference_edit(reference_model, tmp_path)
    assert hashlib.sha256(dW.contiguous().numpy().tobytes()).hexdigest() == FROZEN_SHA256
