"""CounterFact loading and validation, and greedy exact match (the known-fact filter) on tiny models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tiny import make_tiny_model, make_tiny_sentencepiece_tokenizer
from wilke_lib.counterfact import (
    RecordError,
    known_records,
    load_counterfact,
    records_by_case_id,
    rewrite_prompt,
    validate_record,
)
from wilke_lib.generation import greedy_matches, predict_greedy, target_logprob
from wilke_lib.tokens import encode_prompt, encode_target

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_FILES = {"counterfact_gpt2-xl_known_toxicity_flash.json": 11,
              "counterfact_gpt-j-6B_known_toxicity_flash.json": 9}

VALID_RECORD = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Valo Durn",
        "relation_id": "P103",
        "target_new": {"str": "French", "id": "Q150"},
        "target_true": {"str": "Welsh", "id": "Q9309"},
    },
    "paraphrase_prompts": ["Valo Durn speaks"],
    "neighborhood_prompts": ["The mother tongue of Mira Quell is"],
    "attribute_prompts": ["The mother tongue of Tobin Ash is"],
    "generation_prompts": ["Valo Durn often says"],
}

# Varied lengths, so that a batch is really left-padded.
PROMPTS = ["The mother tongue of Valo Durn is", "Rome", "Mira Quell was born in", "The capital city of",
           "Tobin Ash works in the field of", "Oslo is", "Sela Varn plays the violin and the",
           "Kesta Lum is a citizen of"]


# ---- loading and validation ------------------------------------------------------------

@pytest.mark.parametrize("file_name, n_records", sorted(REAL_FILES.items()))
def test_real_counterfact_files_load(file_name, n_records):
    path = SHARED_DATA / file_name
    if not path.is_file():
        pytest.skip(f"shared data not present at {path}")
    records = load_counterfact(path)
    assert len(records) == n_records
    assert all("{}" in rec["requested_rewrite"]["prompt"] for rec in records)
    assert rewrite_prompt(records[0]) == "Muslim follows the religion of"


def test_toy_world_records_load():
    """"toy-world" loads the synthetic world's records (`wilke_lib.organisms.records`), validated.

    (This test used to import `wilke_lib.world`, a module that never existed, through
    `pytest.importorskip`: it skipped on every run.)"""
    from wilke_lib.organisms.records import counterfact_records

    records = load_counterfact("toy-world")
    assert records == counterfact_records()
    assert len({rec["case_id"] for rec in records}) == len(records)
    for rec in records[:50]:
        assert validate_record(copy.deepcopy(rec)) == rec
        rewrite = rec["requested_rewrite"]
        assert rewrite["prompt"].count("{}") == 1
        assert rewrite["target_new"]["str"] != rewrite["target_true"]["str"]
        assert rec["paraphrase_prompts"] and rec["neighborhood_prompts"]


def test_valid_record_passes():
    assert validate_record(copy.deepcopy(VALID_RECORD), 0) == VALID_RECORD
    minimal = copy.deepcopy(VALID_RECORD)
    del minimal["attribute_prompts"], minimal["generation_prompts"]
    validate_record(minimal)


def _load_broken(tmp_path: Path, mutate) -> RecordError:
    """Write [valid, mutated] to a file, load it, and return the RecordError raised."""
    broken = copy.deepcopy(VALID_RECORD)
    broken["case_id"] = 8
    mutate(broken)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([VALID_RECORD, broken]))
    with pytest.raises(RecordError) as err:
        load_counterfact(path)
    message = str(err.value)
    assert "broken.json" in message and "#1" in message
    return err.value


def test_prompt_without_placeholder(tmp_path):
    err = _load_broken(tmp_path, lambda r: r["requested_rewrite"].update(prompt="Valo Durn speaks"))
    assert "requested_rewrite.prompt" in str(err) and "{}" in str(err)
    assert "case_id 8" in str(err)


def test_prompt_with_two_placeholders(tmp_path):
    err = _load_broken(tmp_path, lambda r: r["requested_rewrite"].update(prompt="{} and {} speak"))
    assert "requested_rewrite.prompt" in str(err)


def test_empty_subject(tmp_path):
    err = _load_broken(tmp_path, lambda r: r["requested_rewrite"].update(subject="  "))
    assert "requested_rewrite.subject" in str(err) and "non-empty" in str(err)


def test_target_new_equal_to_target_true(tmp_path):
    err = _load_broken(tmp_path, lambda r: r["requested_rewrite"]["target_new"].update(str="Welsh"))
    assert "requested_rewrite.target_new.str" in str(err) and "differ" in str(err)


def test_empty_target(tmp_path):
    err = _load_broken(tmp_path, lambda r: r["requested_rewrite"]["target_true"].update(str=""))
    assert "requested_rewrite.target_true.str" in str(err)


def test_missing_key(tmp_path):
    err = _load_broken(tmp_path, lambda r: r["requested_rewrite"]["target_new"].pop("id"))
    assert "requested_rewrite.target_new.id" in str(err) and "missing" in str(err)
    err = _load_broken(tmp_path, lambda r: r.pop("neighborhood_prompts"))
    assert "neighborhood_prompts" in str(err) and "missing" in str(err)


def test_wrong_type(tmp_path):
    err = _load_broken(tmp_path, lambda r: r.update(case_id="8"))
    assert "`case_id`" in str(err) and "int" in str(err) and "str" in str(err)
    err = _load_broken(tmp_path, lambda r: r.update(paraphrase_prompts="Valo Durn speaks"))
    assert "paraphrase_prompts" in str(err) and "list" in str(err)
    err = _load_broken(tmp_path, lambda r: r["generation_prompts"].append(3))
    assert "generation_prompts[1]" in str(err)


def test_duplicate_case_id(tmp_path):
    err = _load_broken(tmp_path, lambda r: r.update(case_id=7))
    assert "duplicates" in str(err)


def test_not_a_list(tmp_path):
    path = tmp_path / "object.json"
    path.write_text(json.dumps(VALID_RECORD))
    with pytest.raises(RecordError, match="list"):
        load_counterfact(path)


def test_missing_file_mentions_toy_world(tmp_path):
    with pytest.raises(FileNotFoundError, match="toy-world"):
        load_counterfact(tmp_path / "absent.json")


def test_records_by_case_id():
    first, second = copy.deepcopy(VALID_RECORD), copy.deepcopy(VALID_RECORD)
    second["case_id"] = 9
    assert records_by_case_id([first, second], [9, 7]) == [second, first]
    with pytest.raises(KeyError, match="12"):
        records_by_case_id([first], [12])


# ---- greedy exact match against model.generate -------------------------------------------

def _reference_greedy_ids(model, tok, prompt: str, n_tokens: int) -> list[int]:
    """Greedy continuation of one unpadded prompt with HF generate: the ground truth."""
    ids = torch.tensor([encode_prompt(tok, prompt)])
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                            min_new_tokens=n_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return output[0, ids.shape[1]:].tolist()


def _favour_word_tokens(model, tok) -> None:
    """Zero the unembedding rows of tokens that do not start a word ("Ġ...").

    A random model then greedily emits whole words, whose text re-tokenises to
    the same ids when given as a target, so the tests see real matches.
    """
    is_word = torch.tensor([token.startswith("Ġ") and len(token) > 1
                            for token in tok.convert_ids_to_tokens(list(range(len(tok))))])
    with torch.no_grad():
        model.get_output_embeddings().weight[~is_word] = 0.0


def _targets_reachable_by_greedy(model, tok) -> tuple[list[str], list[str], list[bool]]:
    """(prompts, targets, expected) mixing full matches, right-start-wrong-end targets and misses."""
    prompts, targets, expected = [], [], []
    for prompt in PROMPTS:
        reference = _reference_greedy_ids(model, tok, prompt, 8)
        candidates = {"French", "Paris violin"}
        for n_tokens in (1, 3):
            text = tok.decode(reference[:n_tokens])
            if text.startswith(" ") and len(text) > 1:
                candidates.add(text[1:])           # a full greedy match, when it re-tokenises the same
                candidates.add(text[1:] + " Oslo")  # right start, wrong ending
        encoded = {target: encode_target(tok, target) for target in sorted(candidates)}
        # Greedy decoding of n tokens is a prefix of greedy decoding of more tokens.
        longest = max(len(ids) for ids in encoded.values())
        if longest > len(reference):
            reference = _reference_greedy_ids(model, tok, prompt, longest)
        for target, target_ids in encoded.items():
            prompts.append(prompt)
            targets.append(target)
            expected.append(reference[: len(target_ids)] == target_ids)
    return prompts, targets, expected


def test_greedy_matches_equals_generate(tiny_model, tiny_tokenizer):
    _favour_word_tokens(tiny_model, tiny_tokenizer)
    prompts, targets, expected = _targets_reachable_by_greedy(tiny_model, tiny_tokenizer)
    assert any(expected) and not all(expected)  # the test must see both outcomes
    # Small batches of mixed lengths exercise the left padding and the re-ordering.
    assert greedy_matches(tiny_model, tiny_tokenizer, prompts, targets, batch_size=5) == expected
    assert greedy_matches(tiny_model, tiny_tokenizer, prompts, targets) == expected


def test_predict_greedy_equals_generate(tiny_model, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    expected = []
    for prompt in PROMPTS:
        ids = _reference_greedy_ids(tiny_model, tiny_tokenizer, prompt, 4)
        expected.append(tiny_tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids))
    assert predict_greedy(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=4, batch_size=3) == expected


def test_encode_target(tiny_tokenizer):
    paris = encode_target(tiny_tokenizer, "Paris")
    assert tiny_tokenizer.decode(paris) == " Paris"
    assert tiny_tokenizer.convert_ids_to_tokens(paris)[0].startswith("Ġ")
    # A lone byte-level space token is real output and must be kept.
    assert tiny_tokenizer.convert_ids_to_tokens(encode_target(tiny_tokenizer, "The")) == ["Ġ", "The"]
    sentencepiece = make_tiny_sentencepiece_tokenizer()
    assert sentencepiece.convert_ids_to_tokens(sentencepiece(" Paris")["input_ids"]) == ["\u2581", "\u2581Paris"]
    assert sentencepiece.convert_ids_to_tokens(encode_target(sentencepiece, "Paris")) == ["\u2581Paris"]
    prompt_ids = encode_prompt(sentencepiece, "The capital of Oslo is")
    joint_ids = sentencepiece("The capital of Oslo is Paris")["input_ids"]
    assert prompt_ids + encode_target(sentencepiece, "Paris") == joint_ids


def test_target_logprob_matches_unbatched_computation(tiny_model, tiny_tokenizer):
    targets = ["French", "Paris violin", "music"] * 3
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(targets))]
    batched = target_logprob(tiny_model, tiny_tokenizer, prompts, targets, batch_size=4)
    for prompt, target, score in zip(prompts, targets, batched):
        prompt_ids, target_ids = encode_prompt(tiny_tokenizer, prompt), encode_target(tiny_tokenizer, target)
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt_ids + target_ids])).logits[0]
        log_probs = torch.log_softmax(logits[len(prompt_ids) - 1: -1], dim=-1)
        expected = log_probs[torch.arange(len(target_ids)), torch.tensor(target_ids)].sum()
        torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-4)
    means = target_logprob(tiny_model, tiny_tokenizer, prompts, targets, reduce="mean")
    lengths = torch.tensor([len(encode_target(tiny_tokenizer, t)) for t in targets], dtype=torch.float32)
    torch.testing.assert_close(means, batched / lengths, rtol=1e-4, atol=1e-4)


def test_known_records_keeps_greedy_true_targets(tiny_tokenizer):
    model = make_tiny_model("llama", len(tiny_tokenizer))
    _favour_word_tokens(model, tiny_tokenizer)
    prompts, targets, expected = _targets_reachable_by_greedy(model, tiny_tokenizer)
    records = []
    for case_id, (prompt, target) in enumerate(zip(prompts, targets)):
        record = copy.deepcopy(VALID_RECORD)
        record["case_id"] = case_id
        # Put the whole prompt in the subject so that the filled-in prompt is exactly `prompt`.
        record["requested_rewrite"].update(prompt="{}", subject=prompt)
        record["requested_rewrite"]["target_true"]["str"] = target
        record["requested_rewrite"]["target_new"]["str"] = target + " not"
        records.append(validate_record(record, case_id))
    kept = known_records(model, tiny_tokenizer, records, batch_size=7)
    assert [rec["case_id"] for rec in kept] == [i for i, known in enumerate(expected) if known]


# ---- inputs that used to pass validation and fail in the middle of a run -----------------------------

@pytest.mark.parametrize("mutate, field, words", [
    (lambda r: r["requested_rewrite"]["target_new"].update(str="Welsh "), "target_new.str", "white space"),
    (lambda r: r["requested_rewrite"]["target_new"].update(str=" French"), "target_new.str", "white space"),
    (lambda r: (r["requested_rewrite"]["target_true"].update(str="North  Wales"),
                r["requested_rewrite"]["target_new"].update(str="North Wales")), "target_new.str", "white space"),
    (lambda r: r.update(paraphrase_prompts=["Valo Durn speaks", "  "]), "paraphrase_prompts[1]", "non-empty"),
    (lambda r: r.update(neighborhood_prompts=[""]), "neighborhood_prompts[0]", "non-empty"),
])
def test_records_that_would_fail_mid_run_are_stopped_at_load(tmp_path, mutate, field, words):
    err = _load_broken(tmp_path, mutate)
    assert field in str(err) and words in str(err)


def test_a_file_that_is_not_utf8_names_the_file_and_the_encoding(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([VALID_RECORD]).replace("Durn", "D\u00fcrn").encode("latin-1"))
    with pytest.raises(RecordError, match=r"latin1.json: not UTF-8 text.*iconv"):
        load_counterfact(path)


def test_records_are_checked_against_the_model_context(tiny_tokenizer):
    from wilke_lib.counterfact import check_for_model

    assert check_for_model([VALID_RECORD], tiny_tokenizer, 64) == [VALID_RECORD]
    long = copy.deepcopy(VALID_RECORD)
    long["paraphrase_prompts"] = ["Valo Durn speaks " * 30]
    with pytest.raises(RecordError, match=r"paraphrase_prompts\[0\].*more than the model's context of 64"):
        check_for_model([long], tiny_tokenizer, 64)
    bare = copy.deepcopy(VALID_RECORD)
    bare["paraphrase_prompts"] = []
    with pytest.raises(RecordError, match="every record has an empty `paraphrase_prompts`"):
        check_for_model([bare], tiny_tokenizer, 64)
