"""CounterFact records: loading, validation, and the paper's known-fact filter.

A record follows the CounterFact schema (Meng et al. 2022):
`case_id`, `requested_rewrite` {prompt with one "{}" for the subject, subject,
relation_id, target_new {str, id}, target_true {str, id}}, `paraphrase_prompts`,
`neighborhood_prompts`, and optionally `attribute_prompts`, `generation_prompts`.
Malformed input fails early with a `RecordError` that says where and what.
"""

from __future__ import annotations

import json
import stat
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib import sources
from wilke_lib.errors import RecordError
from wilke_lib.generation import greedy_matches
from wilke_lib.tokens import encode_prompt, encode_target, rewrite_prompt

TOY_WORLD = sources.TOY_WORLD

_REQUIRED_PROMPT_LISTS = ("paraphrase_prompts", "neighborhood_prompts")
_OPTIONAL_PROMPT_LISTS = ("attribute_prompts", "generation_prompts")


def _fail(source: str | None, index: int | None, record: Any, field: str, problem: str) -> RecordError:
    """Build a RecordError naming the file, the record index, its case_id if known, and the field."""
    where = [f"in {source}"] if source else []
    if index is not None:
        where.append(f"record #{index}")
    case_id = record.get("case_id") if isinstance(record, dict) else None
    if case_id is not None:
        where.append(f"(case_id {case_id!r})")
    prefix = " ".join(where)
    return RecordError(f"{prefix + ': ' if prefix else ''}field `{field}` {problem}")


def _type_name(value: Any) -> str:
    return type(value).__name__


ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
"""Characters that print as nothing: a string that differs from another only by these looks the same
in every table while it tokenises differently."""


def canonical(text: str) -> str:
    """`text` as a reader sees it: NFKC-normalised, zero-width characters removed, white space collapsed.
    Two targets with the same canonical form are the same answer, whatever their bytes."""
    text = unicodedata.normalize("NFKC", text).translate({ord(c): None for c in ZERO_WIDTH})
    return " ".join(text.split())


def _unicode_problem(text: str) -> str:
    """Why `text` is not valid Unicode text ("" when it is): a lone surrogate (e.g. from a JSON "\\ud800")
    cannot be encoded as UTF-8, and the tokenizer fails on it with a raw TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"is not valid Unicode text ({err.reason} at position {err.start}: {text[err.start]!r})"
    return ""


def _subject_problem(subject: str) -> str:
    """Why a subject cannot be edited as it looks ("" when it can): one with nothing visible in it, or
    with white space or zero-width characters at either end (the edit would land on another token
    sequence than the one the prompt shows, and the record would quietly leave the known set)."""
    if not canonical(subject):
        return f"must contain visible characters, got {subject!r}"
    if subject != subject.strip() or subject != subject.strip(ZERO_WIDTH):
        return f"must not start or end with white space or zero-width characters, got {subject!r}"
    return ""


def _targets_problem(new: str, true: str) -> str:
    """Why target_new cannot be told from target_true ("" when it can): equal up to white space,
    zero-width characters or NFKC normalisation, or a string prefix of it (new "G" vs true
    "Gouththe": the unedited model already "says" the new target, so ES holds before any edit)."""
    a, b = canonical(new), canonical(true)
    if a == b:
        return (f"must differ from requested_rewrite.target_true.str by more than white space, zero-width "
                f"characters or Unicode (NFKC) normalisation ({new!r} vs {true!r})")
    if b.startswith(a):
        return (f"must not be a prefix of requested_rewrite.target_true.str ({new!r} vs {true!r}): the "
                f"unedited model's answer would already count as the new one")
    return ""


def validate_record(rec: Any, index: int | None = None, source: str | None = None) -> dict:
    """Check one record against the CounterFact schema and return it unchanged.

    `index` (position in the file) and `source` (file name) only serve the error
    message. Raises RecordError naming the field path, e.g.
    `requested_rewrite.target_new.str`, and what is wrong with it.
    """
    def fail(field: str, problem: str) -> RecordError:
        return _fail(source, index, rec, field, problem)

    def require(container: dict, key: str, path: str, kind: type | tuple[type, ...], kind_name: str) -> Any:
        if key not in container:
            raise fail(path, "is missing")
        value = container[key]
        # bool is an int subclass; a True case_id is a bug, not an id.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise fail(path, f"must be {kind_name}, got {_type_name(value)}")
        if isinstance(value, str) and _unicode_problem(value):
            raise fail(path, _unicode_problem(value))
        return value

    if not isinstance(rec, dict):
        raise fail("<record>", f"must be a JSON object, got {_type_name(rec)}")
    require(rec, "case_id", "case_id", int, "an int")
    rewrite = require(rec, "requested_rewrite", "requested_rewrite", dict, "an object")

    prompt = require(rewrite, "prompt", "requested_rewrite.prompt", str, "a string")
    if prompt.count("{}") != 1:
        raise fail("requested_rewrite.prompt", f'must contain exactly one "{{}}" for the subject, got {prompt!r}')
    if prompt.replace("{}", "").count("{") or prompt.replace("{}", "").count("}"):
        raise fail("requested_rewrite.prompt", f"has stray braces besides the one \"{{}}\": {prompt!r}")
    subject = require(rewrite, "subject", "requested_rewrite.subject", str, "a string")
    if not subject.strip():
        raise fail("requested_rewrite.subject", "must be a non-empty string")
    if _subject_problem(subject):
        raise fail("requested_rewrite.subject", _subject_problem(subject))
    require(rewrite, "relation_id", "requested_rewrite.relation_id", str, "a string")

    target_strs = {}
    for which in ("target_new", "target_true"):
        path = f"requested_rewrite.{which}"
        target = require(rewrite, which, path, dict, "an object")
        text = require(target, "str", f"{path}.str", str, "a string")
        if not text.strip():
            raise fail(f"{path}.str", "must be a non-empty string")
        if text != text.strip():
            raise fail(f"{path}.str", f"must not start or end with white space (the space before the object is "
                                      f"added when it is encoded), got {text!r}")
        require(target, "id", f"{path}.id", (str, int), "a string or int")
        target_strs[which] = text
    if _targets_problem(target_strs["target_new"], target_strs["target_true"]):
        raise fail("requested_rewrite.target_new.str",
                   _targets_problem(target_strs["target_new"], target_strs["target_true"]))

    for key in _REQUIRED_PROMPT_LISTS + _OPTIONAL_PROMPT_LISTS:
        if key not in rec and key in _OPTIONAL_PROMPT_LISTS:
            continue
        prompts = require(rec, key, key, list, "a list of strings")
        for position, item in enumerate(prompts):
            if not isinstance(item, str):
                raise fail(f"{key}[{position}]", f"must be a string, got {_type_name(item)}")
            if _unicode_problem(item):
                raise fail(f"{key}[{position}]", _unicode_problem(item))
            if not item.strip():
                raise fail(f"{key}[{position}]", "must be a non-empty prompt")
    return rec


def _fact(rec: dict) -> tuple[str, str, str]:
    """(subject, relation_id, target_true) as a reader sees them: the fact a record states."""
    rw = rec["requested_rewrite"]
    return canonical(rw["subject"]), rw["relation_id"], canonical(rw["target_true"]["str"])


def validate_records(records: Any, source: str | None = None) -> list[dict]:
    """Validate a whole list of records; case_ids must be unique, and so must the facts (subject,
    relation_id, target_true): one fact under two case_ids would be edited and counted twice."""
    if not isinstance(records, list):
        raise RecordError(f"{source or 'records'}: expected a JSON list of records, got {_type_name(records)}")
    seen: dict[int, int] = {}
    facts: dict[tuple[str, str, str], int] = {}
    for index, rec in enumerate(records):
        validate_record(rec, index, source)
        if rec["case_id"] in seen:
            raise _fail(source, index, rec, "case_id",
                        f"duplicates the case_id of record #{seen[rec['case_id']]}")
        seen[rec["case_id"]] = index
        first = facts.setdefault(_fact(rec), index)
        if first != index:
            raise _fail(source, index, rec, "requested_rewrite",
                        f"states the same fact (subject, relation_id, target_true) {_fact(rec)} as record "
                        f"#{first} (case_id {records[first]['case_id']!r}); keep one of them")
    return records


def _keep_duplicate_keys(found: list[tuple[dict, str, Any, Any]]) -> Any:
    """An `object_pairs_hook` for json.loads that notes every key an object has twice (json keeps the
    last one silently: a `case_id` 0 followed by a `case_id` 5 would become record 5)."""
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                found.append((out, key, out[key], value))
            out[key] = value
        return out
    return hook


def _path_to(container: Any, target: dict, path: str = "") -> str | None:
    """The field path ("requested_rewrite.target_new") of the object `target` inside `container`."""
    if container is target:
        return path
    children = container.items() if isinstance(container, dict) else (
        enumerate(container) if isinstance(container, list) else ())
    for key, child in children:
        inner = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
        found = _path_to(child, target, inner)
        if found is not None:
            return found
    return None


def _refuse_duplicate_keys(records: Any, found: list[tuple[dict, str, Any, Any]], source: str) -> None:
    """RecordError naming the file, the record and the field of the first key given twice."""
    if not found:
        return
    obj, key, first, second = found[0]
    problem = (f"appears twice in one JSON object (values {first!r} and {second!r}; JSON would keep the last "
               f"one silently): keep one of them")
    for index, rec in enumerate(records if isinstance(records, list) else []):
        path = _path_to(rec, obj)
        if path is not None:
            raise _fail(source, index, rec, f"{path}.{key}" if path else key, problem)
    raise RecordError(f"in {source}: the key {key!r} {problem}")


def _what_is(path: Path) -> str:
    """What a path that exists but is not a regular file is, in words, for `_refuse_non_file`."""
    mode = path.stat().st_mode
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "neither a file nor a folder")


def _refuse_non_file(path: Path) -> None:
    """FileNotFoundError for a path that does not exist, RecordError saying what it is for one that is not a
    regular file (`/dev/stdin`, a FIFO, a folder): such a path exists, so "not found" would mislead, and a
    pipe cannot be read twice or fingerprinted as the run's records, so it is refused rather than read
    (reading it could also block for ever on a pipe nobody writes to)."""
    if path.is_file():
        return
    if not path.exists():
        raise FileNotFoundError(f"CounterFact file not found: {path} (or pass {TOY_WORLD!r} for the synthetic world)")
    raise RecordError(f"CounterFact records: {path} is {_what_is(path)}, not a regular file: give the path of a "
                      f"JSON file (save piped records to a file first), or {TOY_WORLD!r} for the synthetic world")


def load_counterfact(source: str | Path) -> list[dict]:
    """Load and validate CounterFact records.

    `source` is a path to a CounterFact JSON file (a list of records) or the name of a record source
    (`wilke_lib.sources`): "toy-world", the synthetic world's records
    (`wilke_lib.organisms.records.counterfact_records()`).
    """
    if str(source) in sources.record_sources():
        return validate_records(sources.named_records(str(source)), str(source))
    path = Path(source).expanduser()
    _refuse_non_file(path)
    data = path.read_bytes()
    duplicates: list[tuple[dict, str, Any, Any]] = []
    try:
        records = json.loads(data.decode("utf-8"), object_pairs_hook=_keep_duplicate_keys(duplicates))
    except UnicodeDecodeError as err:
        encoding = "UTF-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data[:4] else "latin1"
        raise RecordError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}), probably {encoding}; CounterFact "
                          f"files are UTF-8 JSON: convert it, e.g. `iconv -f {encoding} -t utf-8`") from err
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: not valid JSON ({err})") from err
    except RecursionError as err:  # json's parser gives up after about 1,000 levels, with a raw RecursionError
        raise RecordError(f"{path}: JSON nested too deeply to be a records file (a CounterFact file is a list of "
                          f"records nested a few levels; this one goes past Python's limit of about 1,000)") from err
    _refuse_duplicate_keys(records, duplicates, str(path))
    return validate_records(records, str(path))


def check_for_model(records: Sequence[dict], tok: PreTrainedTokenizerBase, max_positions: int | None,
                    source: str = "records", margin: int = 16, positions: Sequence[int] | None = None) -> list[dict]:
    """Check valid records against a model before a run starts: every prompt, filled with its subject
    and followed by its longer target, must fit in the model's context with `margin` tokens to spare
    (ROME's context prefixes go in front), every target must encode to at least one token, neither
    target may be a token prefix of the other, and the records together must have paraphrase and
    neighbourhood prompts (else PS or NS has no value). RecordError naming the record (`positions[i]`,
    its place in the file, else i) and the field otherwise."""
    for index, rec in zip(positions if positions is not None else range(len(records)), records):
        rw = rec["requested_rewrite"]
        targets = {w: encode_target(tok, rw[w]["str"], f"requested_rewrite.{w}.str") for w in ("target_new", "target_true")}
        problem = _token_prefix_problem(targets["target_new"], targets["target_true"], rw)
        if problem:
            raise _fail(source, index, rec, "requested_rewrite.target_new.str", problem)
        longest = max(len(t) for t in targets.values())
        fields = [("requested_rewrite.prompt", rewrite_prompt(rec))] + [
            (f"{key}[{i}]", p) for key in _REQUIRED_PROMPT_LISTS for i, p in enumerate(rec.get(key, []))]
        for field, prompt in fields:
            n = len(encode_prompt(tok, prompt)) + longest
            if max_positions is not None and n + margin > max_positions:
                raise _fail(source, index, rec, field, f"is {n} tokens with its target, more than the model's "
                                                       f"context of {max_positions} minus {margin} for the prefixes")
    for key in _REQUIRED_PROMPT_LISTS:
        if records and not any(rec.get(key) for rec in records):
            raise RecordError(f"{source}: every record has an empty `{key}`: the lifelong metrics need some")
    return list(records)


def _token_prefix_problem(new: list[int], true: list[int], rw: dict) -> str:
    """Why two encoded targets cannot be told apart by greedy matching ("" when they can). The metrics
    generate as many tokens as the target has and compare: a target_new that is a token prefix of
    target_true is "answered" by the unedited model (ES true before any edit), and a target_true that is
    a token prefix of target_new is "answered" by the edited model (NS and the rollback true for free)."""
    pair = f"({rw['target_new']['str']!r} {new} vs {rw['target_true']['str']!r} {true})"
    if true[:len(new)] == new:
        return (f"is a token prefix of requested_rewrite.target_true.str for this tokenizer {pair}: the unedited "
                f"model's answer already counts as the new one, so ES would hold before any edit")
    if new[:len(true)] == true:
        return (f"starts with the tokens of requested_rewrite.target_true.str for this tokenizer {pair}: the "
                f"edited model's answer would also count as the true one (NS and the rollback true for free)")
    return ""


def known_records(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[dict],
                  batch_size: int = 64) -> list[dict]:
    """The paper's known-fact filter: records whose rewrite prompt greedily yields all of target_true."""
    prompts = [rewrite_prompt(rec) for rec in records]
    targets = [rec["requested_rewrite"]["target_true"]["str"] for rec in records]
    matches = greedy_matches(model, tok, prompts, targets, batch_size=batch_size)
    return [rec for rec, known in zip(records, matches) if known]


def records_by_case_id(records: Iterable[dict], ids: Iterable[int]) -> list[dict]:
    """The records with the given case_ids, in the order of `ids`; KeyError names any missing id."""
    by_id = {rec["case_id"]: rec for rec in records}
    ids = list(ids)
    missing = [case_id for case_id in ids if case_id not in by_id]
    if missing:
        raise KeyError(f"case_id(s) not in the records: {missing}")
    return [by_id[case_id] for case_id in ids]
