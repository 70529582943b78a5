"""The hypernetwork editors MEND and KE (`editors.mend`, `editors.ke`, trained by `editors.hypernet`) on tiny
random models of every architecture: the gradient factors are the gradient, the edited forward is the
edited weights, a briefly trained network edits through `editing.edit` (only its layers' W_proj), a
failed edit and the journal's restore leave bit-identical weights, a network trained for a handful of
steps makes the new target far more probable, and missing or mismatched weight files and bad settings
get clear errors. On the organisms (skipped until their networks are trained): single-edit success."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

from tiny import TINY_ARCHS, make_tiny_model
from wilke_lib.arch import ModelAdapter
from wilke_lib.editing import EDITORS, EditError, edit, rollback
from wilke_lib.editors.common import WeightJournal
from wilke_lib.editors.hypernet import TrainingRequest, train_network
from wilke_lib.editors.hypernet_core import (added_deltas, base_fingerprint, forward_logits, gradient_factors,
                                             lm_batch, row_argmax_match, row_nll, save_network,
                                             weight_gradient)
from wilke_lib.hparams import KEHParams, MENDHParams, hparams_from_file, load_hparams
from wilke_lib.models import ORGANISMS_DIR
from wilke_lib.tokens import prepare_request

SUBJECTS = ["Valo Durn", "Mira Quell", "Tobin Ash", "Sela Varn", "Orrin Pike", "Kesta Lum"]
NEW = ["Norway", "Paris", "Japan", "Oslo"]
LAYERS = [2, 3]


def requests() -> list[TrainingRequest]:
    """Four synthetic training requests (the last without target_true: KE's condition then reads the
    model's own answer), each with a paraphrase and a locality prompt."""
    out = []
    for i, (subject, new) in enumerate(zip(SUBJECTS, NEW)):
        request = {"prompt": "The capital city of {}", "subject": subject, "target_new": {"str": new}}
        if i < 3:
            request["target_true"] = {"str": "Spain"}
        out.append(TrainingRequest(request, [f"The home of {subject} is the capital city of"],
                                   [f"A friend of {SUBJECTS[(i + 3) % len(SUBJECTS)]}"]))
    return out


def fresh_model(arch: str, tok):
    return make_tiny_model(arch, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def small_hparams(editor: str, weights: str, **changes):
    if editor == "mend":
        hp = MENDHParams(layers=LAYERS, weights=weights, rank=16, edit_lr=1e-2, lr_lr=1e-2, batch_size=4, lr=3e-3,
                         train_steps=4)
    else:
        hp = KEHParams(layers=LAYERS, weights=weights, lstm_hidden=16, condition_dim=32, hidden_dim=32, batch_size=4,
                       lr=3e-3, max_scale=10.0, train_steps=4)
    return dataclasses.replace(hp, **changes)


def trained(model, tok, editor: str, folder: Path, **changes):
    """(hparams whose weights file is a network trained on `requests()` for this model, metrics)."""
    hp = small_hparams(editor, str(folder / f"{editor}.safetensors"), **changes)
    net, metrics = train_network(model, tok, editor, hp, requests(), progress=False)
    save_network(net, Path(hp.weights), editor, net.config(), base_fingerprint(model), {"metrics": metrics})
    return hp, metrics


def digest(model) -> dict[str, str]:
    return {n: hashlib.sha256(p.detach().contiguous().numpy().tobytes()).hexdigest() for n, p in model.named_parameters()}


def new_logprob(model, tok, request: dict) -> float:
    p = prepare_request(tok, request)
    batch = lm_batch(tok, [p.prompt], [p.target_new_ids], "cpu")
    with torch.no_grad():
        return -float(row_nll(forward_logits(model, batch), batch.labels)[0])


# ---- the mathematics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gradient_factors_are_the_gradient_of_w_proj(arch, tok):
    """sum_t delta_t u_t^T of each row is the autograd gradient of that row's NLL with respect to W_proj."""
    model = fresh_model(arch, tok)
    adapter = ModelAdapter(model)
    reqs = [prepare_request(tok, r.request) for r in requests()[:2]]
    batch = lm_batch(tok, [p.prompt for p in reqs], [p.target_new_ids for p in reqs], "cpu")
    factors = gradient_factors(model, batch, LAYERS)
    for row in range(2):
        weights = [adapter.mlp_out(l).weight for l in LAYERS]
        for w in weights:
            w.requires_grad_(True)
        one = lm_batch(tok, [reqs[row].prompt], [reqs[row].target_new_ids], "cpu")
        grads = torch.autograd.grad(row_nll(forward_logits(model, one), one.labels).sum(), weights)
        for layer, w, g in zip(LAYERS, weights, grads):
            w.requires_grad_(False)
            expected = g.T if adapter.out_weight_param(layer)[1] else g  # Conv1D stores W transposed
            got = weight_gradient(*factors[layer])[row]
            assert expected.abs().max() > 1e-6
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_the_edited_forward_is_the_forward_of_the_edited_weights(arch, tok):
    model = fresh_model(arch, tok)
    adapter = ModelAdapter(model)
    gen = torch.Generator().manual_seed(0)
    deltas = {l: 0.05 * torch.randn(2, adapter.d_model, adapter.d_mlp, generator=gen) for l in LAYERS}
    batch = lm_batch(tok, ["The capital city of Valo Durn", "A friend of Mira Quell"], [[], []], "cpu")
    with torch.no_grad(), added_deltas(model, deltas):
        hooked = forward_logits(model, batch)
    for row in range(2):
        journal = WeightJournal(adapter)
        for l in LAYERS:
            journal.add(l, deltas[l][row])
        with torch.no_grad():
            edited = forward_logits(model, batch)
        journal.restore()
        torch.testing.assert_close(hooked[row][batch.mask[row].bool()], edited[row][batch.mask[row].bool()],
                                   rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        unedited = forward_logits(model, batch)
    assert (unedited - hooked).abs().max() > 1e-3


# ---- the editors through editing.edit ------------------------------------------------------------------

def test_registry_has_the_hypernetwork_editors():
    assert {"mend", "ke"} <= set(EDITORS)


@pytest.mark.parametrize("editor", ["mend", "ke"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_an_edit_changes_the_w_proj_of_its_layers_only(arch, editor, tok, tmp_path):
    model = fresh_model(arch, tok)
    hp, _ = trained(model, tok, editor, tmp_path)
    adapter = ModelAdapter(model)
    before = digest(model)
    request = requests()[0].request
    result = edit(model, tok, request, hp)
    assert result.editor == editor and result.layers == LAYERS
    after = digest(model)
    assert {n for n in before if before[n] != after[n]} == {adapter.name_of("mlp_out", l) + ".weight" for l in LAYERS}
    assert set(result.weight_deltas) == {adapter.name_of("mlp_out", l) for l in LAYERS}
    assert all(result.weight_deltas[adapter.name_of("mlp_out", l)].norm() > 0 for l in LAYERS)
    back = rollback(model, tok, request, hp, result)  # the paper's rollback: the swapped request, same layers
    assert back.layers == LAYERS and digest(model) != after


TRAINED = {"mend": dict(train_steps=60, lr=1e-2, edit_lr=0.05, lr_lr=1e-2, c_edit=1.0),
           "ke": dict(train_steps=60, lr=1e-2, max_scale=30.0, kl_margin=0.1)}


@pytest.mark.slow  # trains a network: 20-26 s each (measured on a shared 2-core machine)
@pytest.mark.parametrize("editor", ["mend", "ke"])
def test_a_trained_network_makes_the_new_target_far_more_probable(editor, tok, tmp_path):
    """60 steps on the four requests: each edit raises log p(target_new) by > 3.5 nats (from -6 to -8), and
    more than the network after one step (KE's: by 2 nats; MEND's, a gradient step from the start, by less);
    MEND makes the new target the greedy answer of at least 3 of the 4."""
    model = fresh_model("gpt2", tok)
    once = small_hparams(editor, str(tmp_path / "once.safetensors"), **{**TRAINED[editor], "train_steps": 1})
    net, _ = train_network(model, tok, editor, once, requests(), progress=False)
    save_network(net, Path(once.weights), editor, net.config(), base_fingerprint(model), {})
    hp, metrics = trained(model, tok, editor, tmp_path, **TRAINED[editor])
    answered = 0
    for r in requests():
        start = new_logprob(model, tok, r.request)
        after_one_step = new_logprob(edit(model, tok, r.request, once, copy=True).model, tok, r.request)
        edited = edit(model, tok, r.request, hp, copy=True).model
        after = new_logprob(edited, tok, r.request)
        print(f"{editor}: log p(new) {start:.2f} unedited, {after_one_step:.2f} after 1 step, {after:.2f} trained")
        assert after > start + 3.5 and after > after_one_step + (2.0 if editor == "ke" else 0.0)
        p = prepare_request(tok, r.request)
        batch = lm_batch(tok, [p.prompt], [p.target_new_ids], "cpu")
        with torch.no_grad():
            answered += int(row_argmax_match(forward_logits(edited, batch), batch.labels)[0])
    print(editor, answered, metrics)
    if editor == "mend":
        assert answered >= 3


@pytest.mark.parametrize("editor", ["mend", "ke"])
def test_a_failed_edit_and_the_journal_leave_bit_identical_weights(editor, tok, tmp_path):
    model = fresh_model("gptj", tok)
    hp, _ = trained(model, tok, editor, tmp_path)
    adapter = ModelAdapter(model)
    before = digest(model)
    # the journal of a successful edit restores the weights bit for bit
    journal = WeightJournal(adapter)
    EDITORS[editor](model, tok, requests()[0].request, hp, journal=journal, layers=None)
    assert digest(model) != before
    journal.restore()
    assert digest(model) == before
    # an impossible request, and a non-finite update, are EditErrors that leave the weights as they were
    with pytest.raises(EditError, match="not found"):
        edit(model, tok, {**requests()[0].request, "prompt": "The capital city of Spain", "subject": "Nobody"}, hp)
    handle = adapter.final_norm.register_forward_hook(lambda m, i, o: o * float("inf"))
    try:
        with pytest.raises(EditError, match="non-finite"):
            edit(model, tok, requests()[0].request, hp)
    finally:
        handle.remove()
    assert digest(model) == before
    with pytest.raises(ValueError, match="edits layers"):
        edit(model, tok, requests()[0].request, hp, layers=[0])


# ---- weight files and settings ---------------------------------------------------------------------------

@pytest.mark.parametrize("editor", ["mend", "ke"])
def test_missing_or_mismatched_weights_get_clear_errors(editor, tok, tmp_path):
    model = fresh_model("gpt2", tok)
    before = digest(model)
    missing = small_hparams(editor, str(tmp_path / "nowhere" / f"{editor}.safetensors"))
    with pytest.raises(FileNotFoundError, match=rf"nowhere/{editor}\.safetensors.*python -m wilke_lib\.editors\.hypernet"):
        edit(model, tok, requests()[0].request, missing)
    hp, _ = trained(model, tok, editor, tmp_path)
    other = fresh_model("gpt2", tok)
    with torch.no_grad():
        ModelAdapter(other).embed.weight.mul_(1.5)  # another model of the same shape
    with pytest.raises(ValueError, match=rf"{editor}\.safetensors was trained for another model"):
        edit(other, tok, requests()[0].request, hp)
    changed = dataclasses.replace(hp, layers=[1, 3])
    with pytest.raises(ValueError, match="other settings.*layers"):
        edit(model, tok, requests()[0].request, changed)
    not_a_network = tmp_path / "junk.safetensors"
    not_a_network.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable"):
        edit(model, tok, requests()[0].request, dataclasses.replace(hp, weights=str(not_a_network)))
    assert digest(model) == before
    # an edited model keeps the network: the check ignores the W_proj that edits change
    edit(model, tok, requests()[0].request, hp)
    edit(model, tok, requests()[1].request, hp)


def test_a_network_beside_the_model_is_no_part_of_its_identity(tok, tmp_path):
    """Training MEND into the model's directory (weights relative to it) leaves `models.model_key` as it
    was, so the model's runs and caches stay valid."""
    from wilke_lib.models import load_model, model_key

    model = fresh_model("gpt2", tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok = load_model(tmp_path / "m", device="cpu")
    key = model_key(tmp_path / "m")
    hp = small_hparams("mend", "mend.safetensors")
    net, _ = train_network(model, tok, "mend", hp, requests(), progress=False)
    save_network(net, tmp_path / "m" / "mend.safetensors", "mend", net.config(), base_fingerprint(model), {})
    assert model_key(tmp_path / "m") == key
    edit(model, tok, requests()[0].request, hp)  # found relative to the model's directory
    (tmp_path / "m" / "ke.safetensors").write_bytes(b"half-written")  # a network still being saved
    (tmp_path / "m" / "report.json").write_text("{}")
    assert model_key(tmp_path / "m") == key
    shard = (tmp_path / "m" / "model-00002-of-00002.safetensors")
    shard.write_bytes((tmp_path / "m" / "model.safetensors").read_bytes())
    assert model_key(tmp_path / "m") != key  # another weights file of the loader's still counts


@pytest.mark.parametrize("cls, changes, words", [
    (MENDHParams, {"rank": 0}, "rank: must be >= 1"), (MENDHParams, {"edit_lr": 0.0}, "edit_lr: must be > 0"),
    (MENDHParams, {"weights": "mend.pt"}, "weights must name a .safetensors file"),
    (MENDHParams, {"layers": [-1]}, "non-negative"), (MENDHParams, {"c_edit": "high"}, "expected float"),
    (KEHParams, {"kl_margin": -1.0}, "kl_margin: must be >= 0"), (KEHParams, {"lstm_hidden": 1.5}, "expected int"),
    (KEHParams, {"max_scale": float("nan")}, "finite"), (KEHParams, {"train_steps": 0}, "train_steps: must be >= 1"),
])
def test_hparams_are_validated(cls, changes, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        cls(**{"layers": [1, 2], **changes})


def test_shipped_hparams(tmp_path):
    for editor in ("mend", "ke"):
        for name in ("toy-gpt2", "toy-gptj", "gpt2-xl", "gpt-j-6b"):
            hp = load_hparams(editor, name)
            assert hp.weights.endswith(f"{editor}.safetensors")
        assert load_hparams(editor, "gpt2-xl").layers == [45, 46, 47]  # MEND: the MLPs of the last 3 blocks
        assert load_hparams(editor, "gpt-j-6b").layers == [25, 26, 27]
        assert load_hparams(editor, "toy-gpt2").layers == [9, 10, 11]
    bad = tmp_path / "mend" / "x.yaml"
    bad.parent.mkdir()
    bad.write_text("layers: [1]\nrnak: 4\n")
    with pytest.raises(ValueError, match="rnak"):
        hparams_from_file(bad)


# ---- the organisms (their trained networks) ---------------------------------------------------------------

@pytest.fixture
def organism(toy_gpt2_known20):
    """toy-gpt2 and 20 evenly spaced records it knows (tests/conftest.py: loaded once per session)."""
    return toy_gpt2_known20


@pytest.mark.slow
@pytest.mark.parametrize("editor, at_least", [("mend", 11), ("ke", 7)])
def test_single_edit_success_on_the_organism(editor, at_least, organism):
    """The shipped networks edit most of 20 known toy-gpt2 records (measured: MEND 14, KE 10 of 20; on 50
    records 88% and 76%, wilke_lib/hparams/README.md); the bound leaves room for another platform's rounding."""
    from wilke_lib.counterfact import rewrite_prompt
    from wilke_lib.generation import greedy_matches

    if not (ORGANISMS_DIR / "toy-gpt2" / f"{editor}.safetensors").is_file():
        pytest.skip(f"organisms/toy-gpt2/{editor}.safetensors not trained "
                    f"(python -m wilke_lib.editors.hypernet --model toy-gpt2 --editor {editor})")
    model, tok, records = organism
    hp = load_hparams(editor, "toy-gpt2")
    hits = 0
    for record in records:
        result = edit(model, tok, record, hp, copy=True)
        hits += greedy_matches(result.model, tok, [rewrite_prompt(record)], [record["requested_rewrite"]["target_new"]["str"]])[0]
    print(f"{editor}: {hits}/20")
    assert hits >= at_least
