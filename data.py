"""Text to tensors: dataset readers and downloads, splits, prompt rendering, tokenization and collation.

Bottom layer of macpo: imports nothing from the project. Every (prompt, response) pair becomes token ids in
exactly one place, `encode_many`, used by training, reference caching and perplexity scoring alike.
"""
import functools
import gzip
import hashlib
import json
import os
import random
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import EntryNotFoundError, HTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled


class DataError(ValueError):
    """A problem with the user's data: the message names the file and line (or the flag) to fix."""


class ModelLoadError(RuntimeError):
    """A model name or path that cannot be loaded; the message says what to download and where to put it."""


@dataclass
class Example:
    """One preference record. `prompt` is the conversation so far as role/content turns ending with a user
    turn; `chosen` / `rejected` are bare response texts (no template, no EOS). `rejected` is None for SFT-only
    records. `source` is "file:line" so any later error can point back at the record."""
    prompt: list            # [{"role": "user" | "assistant", "content": str}, ...], last role == "user"
    chosen: str
    rejected: str | None = None
    source: str = ""


# ---------------------------------------------------------------------------------------------------------
# Reading datasets in their original formats. Every reader returns list[Example] with source = "path:line".
# Malformed lines raise DataError naming the file and line; known-bad records of the public datasets (a response
# that is empty, or identical on both sides) are skipped, counted, and reported in one line on stderr.

def _loads(text, path, line=None):
    """json.loads with errors naming the file and line: `line` when `text` is that one line of a JSONL file,
    else (the whole file) the decoder's own line number."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line or e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:     # a number too long for int(), or nesting too deep
        raise DataError(f"{path}{'' if line is None else f':{line}'}: not readable JSON ({str(e)[:120]})") from None


def _json_lines(path):
    """Yield (line number, parsed JSON object) for each non-blank line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lineno = 0
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                                    f"{e.start + 1})") from None
                if not text.strip():
                    continue
                record = _loads(text, path, lineno)
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                yield lineno, record
        # gzip reports a cut-off download only when it reaches the missing end; every line before it was whole.
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path}:{lineno + 1}: the file is truncated or corrupt ({e}); "
                            "delete it and download it again") from None


def read_jsonl(path):
    """Every JSON object of a .jsonl or .jsonl.gz file, in order: the one JSONL reader (datasets, and the
    generations, pairs and metrics a run writes). A malformed line is a DataError naming the file and line."""
    return [record for _, record in _json_lines(path)]


def _field(record, key, kind, where):
    """record[key], which must exist and be of type `kind` (bool does not pass for int)."""
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise DataError(f"{where}: field {key!r} should be {expected}, got {type(value).__name__}")
    return value


def _skip_reason(chosen, rejected):
    """Why a (chosen, rejected) pair teaches nothing, or None if it is usable. rejected=None is an SFT record."""
    if not chosen or rejected == "":
        return "empty response"
    if chosen == rejected:
        return "chosen == rejected"
    return None


def _report_skips(reader, path, total, skipped):
    """One line on stderr, so that no record disappears without a trace."""
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
        print(f"{reader}: skipped {sum(skipped.values())} of {total} records in {path} ({reasons})", file=sys.stderr)


HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _hh_turns(text):
    """'\\n\\nHuman: q1\\n\\nAssistant: a1\\n\\nHuman: q2' -> role/content turns, or None if the text is not a
    dialogue that starts with a Human turn and ends with one."""
    parts = re.split(r"\n\n(Human|Assistant):", text)   # [text before the first turn, role, content, role, ...]
    if parts[0].strip() or len(parts) < 3 or parts[-2] != "Human":
        return None
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def read_hh(path):
    """Anthropic HH-RLHF (.jsonl.gz or .jsonl, lines {"chosen": dialogue, "rejected": dialogue}) -> Examples.

    The prompt is each dialogue up to its last "\\n\\nAssistant:"; the response is the text after it, stripped.
    Skipped and reported: no Assistant turn, the two prompts differ (a response that itself contains an
    "\\n\\nAssistant:" turn), a prompt that is not a Human-first, Human-last dialogue, an empty response, and
    chosen == rejected. (Of the 2354 helpful-base test rows, 15 are skipped; 9 of the 2312 harmless-base.)
    """
    examples, skipped, total = [], Counter(), 0
    for lineno, record in _json_lines(path):
        total += 1
        where = f"{path}:{lineno}"
        chosen_text, rejected_text = _field(record, "chosen", str, where), _field(record, "rejected", str, where)
        c, r = chosen_text.rfind(ASSISTANT), rejected_text.rfind(ASSISTANT)
        if c < 0 or r < 0:
            skipped["no Assistant turn"] += 1
            continue
        if chosen_text[:c] != rejected_text[:r]:
            skipped["prompts differ"] += 1
            continue
        prompt = _hh_turns(chosen_text[:c])
        if prompt is None:
            skipped["prompt not a Human ... Human dialogue"] += 1
            continue
        chosen, rejected = chosen_text[c + len(ASSISTANT):].strip(), rejected_text[r + len(ASSISTANT):].strip()
        if reason := _skip_reason(chosen, rejected):
            skipped[reason] += 1
            continue
        examples.append(Example(prompt, chosen, rejected, where))
    _report_skips("read_hh", path, total, skipped)
    return examples


PKU_ORDERS = ("safer", "better")


def read_pku(path, order="safer"):
    """PKU-SafeRLHF JSONL (prompt, response_0, response_1, better_response_id, safer_response_id, ...) ->
    single-turn Examples. order="safer" makes the safer response `chosen` (the harmlessness label),
    order="better" the more helpful one. The is_response_*_safe labels are not used."""
    if order not in PKU_ORDERS:
        raise DataError(f"unknown PKU order {order!r}; choose one of {', '.join(PKU_ORDERS)}")
    label = f"{order}_response_id"
    examples, skipped, total = [], Counter(), 0
    for lineno, record in _json_lines(path):
        total += 1
        where = f"{path}:{lineno}"
        prompt = _field(record, "prompt", str, where).strip()
        responses = [_field(record, "response_0", str, where).strip(), _field(record, "response_1", str, where).strip()]
        best = _field(record, label, int, where)
        if best not in (0, 1):
            raise DataError(f"{where}: field {label!r} should be 0 or 1, got {best}")
        chosen, rejected = responses[best], responses[1 - best]
        if not prompt:
            skipped["empty prompt"] += 1
            continue
        if reason := _skip_reason(chosen, rejected):
            skipped[reason] += 1
            continue
        examples.append(Example([{"role": "user", "content": prompt}], chosen, rejected, where))
    _report_skips("read_pku", path, total, skipped)
    return examples


def _json_list(path):
    """Yield (record index, line where the record starts, record) for a file holding one JSON list."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x})") from None
    records = _loads(text, path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    # json.loads keeps no positions; walk the (now known valid) list once more with raw_decode to find where each
    # record starts, so errors and `source` can name a line.
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    for index, record in enumerate(records):
        pos = re.compile(r"[\s,]*").match(text, pos).end()
        line = text.count("\n", 0, pos) + 1
        pos = decoder.raw_decode(text, pos)[1]
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line} (record {index}): expected a JSON object, got {type(record).__name__}")
        yield index, line, record


def _flat_turns(text):
    """The release's flattened HH dialogue "USER: q1 ASSISTANT: a1 USER: q2" -> role/content turns, or None if
    it does not end with a user turn. Text not starting with "USER:" (PKU) is one user turn."""
    if not re.match(r"USER:(?=\s|$)", text):          # "USER:x" is not a turn marker (the split below agrees)
        return [{"role": "user", "content": text.strip()}]
    parts = re.split(r"(?:^|\s)(USER|ASSISTANT):(?=\s|$)", text)   # ["", role, content, role, content, ...]
    if parts[-2] != "USER":
        return None
    return [{"role": "user" if role == "USER" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def read_llamafactory(path):
    """The official MACPO release's LLaMA-Factory JSON: a list of {"instruction", "input", "output"}.

    output is a string (SFT file: rejected=None) or a list [chosen, rejected] (pairwise file). A non-empty
    input is appended to the instruction after "\\n" (the alpaca convention). Errors name the file, the line
    where the record starts, and its index in the list. Skipped and reported: an empty prompt, an empty
    response, chosen == rejected.
    """
    examples, skipped, total = [], Counter(), 0
    for index, line, record in _json_list(path):
        total += 1
        where = f"{path}:{line} (record {index})"
        instruction = _field(record, "instruction", str, where)
        extra = _field(record, "input", str, where) if "input" in record else ""
        prompt = _flat_turns(f"{instruction}\n{extra}" if extra else instruction)
        if prompt is None:
            raise DataError(f"{where}: the instruction's last turn is ASSISTANT:, expected a USER: turn")
        output = record.get("output")
        if isinstance(output, str):
            chosen, rejected = output.strip(), None
        elif isinstance(output, list) and len(output) == 2 and all(isinstance(o, str) for o in output):
            chosen, rejected = output[0].strip(), output[1].strip()
        else:
            raise DataError(f"{where}: field 'output' should be a string or a list [chosen, rejected] of two "
                            f"strings, got {output!r:.80}")
        if not any(t["content"] for t in prompt):
            skipped["empty prompt"] += 1
            continue
        if reason := _skip_reason(chosen, rejected):
            skipped[reason] += 1
            continue
        examples.append(Example(prompt, chosen, rejected, f"{path}:{line}"))
    _report_skips("read_llamafactory", path, total, skipped)
    return examples


def read_jsonl_pairs(path):
    """Your own data: JSONL of {"prompt": str or [{"role", "content"}, ...], "chosen": str, "rejected": str}.
    "rejected" may be left out (SFT records). A list prompt must end with a user turn. Skipped and reported: an
    empty prompt (every turn empty), an empty response, chosen == rejected."""
    examples, skipped, total = [], Counter(), 0
    for lineno, record in _json_lines(path):
        total += 1
        where = f"{path}:{lineno}"
        prompt = _field(record, "prompt", (str, list), where)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt.strip()}]
        else:
            for turn in prompt:
                if not (isinstance(turn, dict) and turn.get("role") in ("user", "assistant")
                        and isinstance(turn.get("content"), str)):
                    raise DataError(f'{where}: each prompt turn should be {{"role": "user" or "assistant", '
                                    f'"content": str}}, got {turn!r:.80}')
            if not prompt or prompt[-1]["role"] != "user":
                raise DataError(f"{where}: the prompt's last turn should have role 'user'")
            prompt = [{"role": t["role"], "content": t["content"].strip()} for t in prompt]
        chosen = _field(record, "chosen", str, where).strip()
        rejected = _field(record, "rejected", str, where).strip() if record.get("rejected") is not None else None
        if not any(t["content"] for t in prompt):
            skipped["empty prompt"] += 1
            continue
        if reason := _skip_reason(chosen, rejected):
            skipped[reason] += 1
            continue
        examples.append(Example(prompt, chosen, rejected, where))
    _report_skips("read_jsonl_pairs", path, total, skipped)
    return examples


READERS = {"hh": read_hh, "pku": read_pku, "llamafactory": read_llamafactory, "jsonl": read_jsonl_pairs}


def sniff_format(path):
    """Guess the format from the file's first record: a JSON list is llamafactory; a JSONL line with
    response_0 is pku, with prompt and chosen is jsonl, with chosen and rejected only is hh."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        try:
            first = next((line for line in f if line.strip()), b"").lstrip()
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path}: the file is truncated or corrupt ({e})") from None
    if not first:
        raise DataError(f"{path}: the file is empty")
    if first.startswith(b"["):
        return "llamafactory"
    try:
        record = json.loads(first)
    except (ValueError, RecursionError):
        record = None
    keys = set(record) if isinstance(record, dict) else set()
    if "response_0" in keys:
        return "pku"
    if {"prompt", "chosen"} <= keys:
        return "jsonl"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    found = f"its keys are {', '.join(map(repr, sorted(keys)))}" if keys else "it is not a JSON object"
    raise DataError(f"{path}: cannot tell the format from the first record ({found}). Expected a JSON list of "
                    f"{{instruction, input, output}} (LLaMA-Factory), or JSON lines with prompt, chosen and rejected, "
                    f"with prompt, response_0, response_1 and their labels (PKU-SafeRLHF), or with chosen and "
                    f"rejected dialogues (HH-RLHF)")


def read_any(path, fmt=None, order="safer"):
    """Read `path` with the reader for `fmt` (one of READERS' keys), or the format sniff_format finds.
    `order` is passed on to read_pku."""
    fmt = sniff_format(path) if fmt is None else fmt
    if fmt not in READERS:
        raise DataError(f"unknown data format {fmt!r}; choose one of {', '.join(READERS)}")
    return read_pku(path, order) if fmt == "pku" else READERS[fmt](path)


def require_pairs(examples):
    """examples -> the same list, or DataError when any has no rejected response. MACPO's
    D_init needs preference pairs: each weak teacher trains on the chosen responses and its negative twin on the
    rejected ones, so a file of SFT records (one response per prompt, such as the release's pku_test_1k.json) is
    refused when it is read, before any model loads, naming the first such record."""
    singles = [e for e in examples if e.rejected is None]
    if singles:
        raise DataError(f"{singles[0].source}: this record has no rejected response ({len(singles)} of the file's "
                        f"{len(examples)} records have none). MACPO needs preference pairs for D_init (each teacher's "
                        f"negative twin trains on the rejected responses): give every record one, a \"rejected\" "
                        f"field in JSON lines or \"output\": [chosen, rejected] in LLaMA-Factory JSON")
    return examples


# ---------------------------------------------------------------------------------------------------------
# Downloads: the HH-RLHF and PKU-SafeRLHF files from the Hugging Face hub through huggingface_hub, so that its
# cache and environment variables work as for any HF tool: HF_HOME / HF_HUB_CACHE (where files are kept),
# HF_ENDPOINT (a mirror), HF_TOKEN (gated or private copies), HF_HUB_OFFLINE (the cache only, no network).
# A file in --data_dir comes first and never touches the network.

# name -> (hub dataset repository, file path inside it, subsets). PKU-SafeRLHF's current layout keeps one folder
# per model that wrote the responses under data/; "Alpaca-7B" is the subset generated by Alpaca-7B.
DATASETS = {
    "hh": ("Anthropic/hh-rlhf", "{subset}/{split}.jsonl.gz", ("helpful-base", "harmless-base")),
    "pku": ("PKU-Alignment/PKU-SafeRLHF", "data/{subset}/{split}.jsonl", ("Alpaca-7B",)),
}
SPLITS = ("train", "test")
REVISION = "main"       # a branch, so it can move: the sha256 table below is what pins the bytes
# (name, subset, split) -> (bytes, sha256), from the LFS pointers in anthropics/hh-rlhf. Files not listed are
# not verified.
KNOWN_FILES = {
    ("hh", "helpful-base", "test"): (875191, "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b"),
    ("hh", "harmless-base", "test"): (742801, "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"),
}
# What huggingface_hub raises for a file it can neither find in its cache nor fetch: LocalEntryNotFoundError
# (offline, or unreachable with nothing cached), OfflineModeIsEnabled and HfHubHTTPError (404, 401, gated, 5xx)
# are OSErrors; EntryNotFoundError and httpx's transport errors (a connection cut mid-download) are not in the
# httpx-based releases (checked on huggingface_hub 2.4).
HUB_ERRORS = (OSError, EntryNotFoundError, HTTPError)


def atomic_write(path, write):
    """write(tmp_path), then rename over `path`: a kill leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def _hub_file(name, subset, split):
    """-> (hub repository, file path inside it, the repository's folder name), the flags checked."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    repo, pattern, subsets = DATASETS[name]
    if subset not in subsets or split not in SPLITS:
        raise DataError(f"{name} has subsets {', '.join(subsets)} and splits {', '.join(SPLITS)}; "
                        f"got {subset!r}, {split!r}")
    return repo, pattern.format(subset=subset, split=split), repo.split("/")[1]


def _local_file(data_dir, folder, filename):
    """The file in data_dir, which may be the dataset's own folder laid out as on the hub
    ({data_dir}/helpful-base/test.jsonl.gz) or a folder above it ({data_dir}/hh-rlhf/helpful-base/...); or None."""
    if not data_dir:
        return None
    return next((p for p in (Path(data_dir) / filename, Path(data_dir) / folder / filename) if p.is_file()), None)


def _hub_reason(error):
    """Why huggingface_hub gave no file, in a few words: the error at the bottom of the chain (the refused
    connection says more than the LocalEntryNotFoundError wrapped around it), its first line."""
    while error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


# Without a network huggingface_hub retries each request for about 25 s before giving up, so a run naming four
# hub models would wait minutes to hear what it lacks. One short request first tells whether the hub answers at
# all; when it does not, every check looks in local folders and the hub cache only.
HUB_TIMEOUT = 3.0       # seconds: a slow link's TLS handshake fits, and an offline run still fails fast


def hub_unreachable():
    """Why the hub cannot be asked now, in a few words, or None when it can: HF_HUB_OFFLINE (huggingface_hub's
    own switch) says so without a request; otherwise one HEAD request to the endpoint (HF_ENDPOINT), asked once
    per process and endpoint."""
    if hub_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _hub_answer(hub_constants.ENDPOINT)


@functools.cache
def _hub_answer(endpoint):
    """None if `endpoint` answers a HEAD request within HUB_TIMEOUT seconds (any status below 500), else why not;
    said once on stderr, as later loading would retry for minutes."""
    try:
        status = huggingface_hub.get_session().head(endpoint, timeout=HUB_TIMEOUT).status_code
        reason = None if status < 500 else f"{endpoint} answered HTTP {status}"
    except (HTTPError, OSError) as e:
        reason = f"{endpoint} is unreachable: {type(e).__name__}: {str(e).strip()[:200] or 'no answer'}"
    if reason:
        print(f"{reason}. Looking in local folders and the hub cache only (HF_HUB_OFFLINE=1 skips this "
              f"{HUB_TIMEOUT:g}-second check, and later loading's retries)", file=sys.stderr)
    return reason


def _unavailable(name, subset, split, data_dir, cache_dir, reason):
    """One line for one missing file: what it is, where it is on the hub, why it could not be had (`reason`),
    and the command and path that put it where dataset_file looks in data_dir."""
    repo, filename, folder = _hub_file(name, subset, split)
    url = huggingface_hub.hf_hub_url(repo, filename, repo_type="dataset", revision=REVISION)  # honours HF_ENDPOINT
    # The folder to download into: the dataset's own folder when data_dir already is one, else one below it.
    root = Path(data_dir) if data_dir else Path("DATA_DIR")
    into = root if root.name == folder else root / folder
    place = (f"then it is found at {into / filename}" if data_dir else
             f"then pass --data_dir {root} (the file at {into / filename})")
    local = f"--data_dir {data_dir} or " if data_dir else ""
    return (f"{name} {subset} {split} (dataset {repo}, file {filename}, {url}) is not in {local}the hub cache "
            f"({cache_dir or hub_constants.HF_HUB_CACHE}) and could not be fetched ({reason}). On a "
            f"machine with network: `hf download {repo} {filename} --repo-type dataset --local-dir {into}`, {place}")


def _check_known(path, known, what):
    """A downloaded or cached hub file against its known (bytes, sha256); DataError on a mismatch."""
    sha256, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            size += len(chunk)
    if (size, sha256.hexdigest()) == known:
        return
    # huggingface_hub trusts a blob once it is in the cache and would hand the same bytes to every later run;
    # removing the snapshot's link and the blob behind it makes the next run download the file again.
    try:
        for p in (Path(path), Path(os.path.realpath(path))):
            p.unlink(missing_ok=True)
        fate = "removed from the hub cache"
    except OSError:                     # a read-only shared cache
        fate = f"not used; delete {path}"
    raise DataError(f"{what} has {size} bytes with sha256 {sha256.hexdigest()}, expected {known[0]} bytes with "
                    f"sha256 {known[1]}; {fate}")


def dataset_file(name, subset, split, data_dir=None, cache_dir=None):
    """Local path of one dataset file: in data_dir if it is there (see _local_file), else from the hub cache,
    downloading it there first if needed. cache_dir=None is huggingface_hub's own cache (HF_HUB_CACHE).

    A hub file with a known sha256 is checked on every call, fresh or cached: a mismatch raises DataError and
    the file is not returned. A file neither cached nor reachable (HF_HUB_OFFLINE, no network, a 404) raises
    DataError saying where it is on the hub and where to put it in data_dir. With the hub unreachable
    (hub_unreachable) only the cache is looked in.
    """
    repo, filename, folder = _hub_file(name, subset, split)
    if local := _local_file(data_dir, folder, filename):
        return local
    offline = hub_unreachable()
    try:
        path = huggingface_hub.hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset",
                                               revision=REVISION, cache_dir=cache_dir,
                                               local_files_only=offline is not None)
    except HUB_ERRORS as e:
        raise DataError(_unavailable(name, subset, split, data_dir, cache_dir, offline or _hub_reason(e))) from None
    if known := KNOWN_FILES.get((name, subset, split)):
        _check_known(path, known, f"{repo}/{filename} ({path})")
    return Path(path)


def _probe(repo, filename, cache_dir, ask_hub):
    """Raise what hf_hub_download would raise for this file, without downloading it: a cached file passes, an
    uncached one raises LocalEntryNotFoundError, or with ask_hub costs one metadata request instead."""
    try:
        huggingface_hub.hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset", revision=REVISION,
                                        cache_dir=cache_dir, local_files_only=True)
    except LocalEntryNotFoundError:
        if not ask_hub:
            raise
        huggingface_hub.get_hf_file_metadata(
            huggingface_hub.hf_hub_url(repo, filename, repo_type="dataset", revision=REVISION))


def missing_dataset_files(requests, data_dir=None, cache_dir=None):
    """[(name, subset, split), ...] -> one line, as dataset_file's error words it, for each file that is in
    neither data_dir nor the hub cache and that the hub cannot give now; [] when every one is there or reachable.
    Downloads nothing, so that a run can name everything it lacks, data and models, before any compute. The hub
    is asked only for a file in neither place, and not at all when it is unreachable (hub_unreachable)."""
    missing = []
    for name, subset, split in requests:
        repo, filename, folder = _hub_file(name, subset, split)
        if _local_file(data_dir, folder, filename):
            continue
        offline = hub_unreachable()
        try:
            _probe(repo, filename, cache_dir, ask_hub=offline is None)
        except HUB_ERRORS as e:
            missing.append(_unavailable(name, subset, split, data_dir, cache_dir, offline or _hub_reason(e)))
    return missing


# ---------------------------------------------------------------------------------------------------------
# Splits (paper Sec. 4.1): disjoint sets of prompts for weak-teacher initialisation, the weak-to-strong
# prompts Q_w2s, and test. Paper sizes: 5000 / 5000 / 2000 for HH, 5000 / 5000 / 1000 for PKU.

def _prompt_key(example):
    return tuple((t["role"], t["content"]) for t in example.prompt)


def _distinct_prompts(examples):
    """The first example of each distinct prompt, in file order (PKU has several pairs per prompt)."""
    seen = {}
    for example in examples:
        seen.setdefault(_prompt_key(example), example)
    return list(seen.values())


def paper_splits(examples, n_init, n_w2s, n_test, seed=0):
    """examples -> (init, w2s, test) of exactly n_init, n_w2s, n_test examples, no prompt in two splits.

    One example per distinct prompt (the first in file order), shuffled with `seed`: the same inputs and seed
    always give the same splits.
    """
    pool = _distinct_prompts(examples)
    need = n_init + n_w2s + n_test
    if need > len(pool):
        raise DataError(f"the data has {len(pool)} distinct prompts ({len(examples)} records) but the splits need "
                        f"{need} (--n_init {n_init} + --n_w2s {n_w2s} + --n_test {n_test}); lower --n_init, "
                        f"--n_w2s or --n_test")
    random.Random(seed).shuffle(pool)
    return pool[:n_init], pool[n_init:n_init + n_w2s], pool[n_init + n_w2s:need]


def splits_with_test_file(train, test, n_init, n_w2s, n_test, seed=0):
    """HH has its own test file: init and w2s come from `train` as in paper_splits, and the test split is the
    first n_test distinct prompts of `test` in file order (the release's hh_test_2k files are the head of
    HH's test files), leaving out any prompt already in init or w2s."""
    init, w2s, _ = paper_splits(train, n_init, n_w2s, 0, seed)
    used = {_prompt_key(e) for e in init + w2s}
    pool = [e for e in _distinct_prompts(test) if _prompt_key(e) not in used]
    if n_test > len(pool):
        raise DataError(f"the test file has {len(pool)} distinct prompts not in the training splits but --n_test is "
                        f"{n_test}; lower --n_test")
    return init, w2s, pool[:n_test]


# ---------------------------------------------------------------------------------------------------------
# Prompt rendering: the one function that turns a conversation into the text a model is conditioned on.

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
TEMPLATES = ("vicuna", "alpaca", "chat", "hh")


def render_prompt(turns, template="vicuna", tokenizer=None, system=None):
    """Conversation (role/content turns ending with a user turn) -> prompt text ending where the reply starts.

    vicuna  "{system} USER: {u1} ASSISTANT: {a1} USER: {u2} ASSISTANT:"  (the release's --template vicuna, HH)
    alpaca  "{system}\\n\\n### Instruction:\\n{u}\\n\\n### Response:\\n"  (the release's --template alpaca, PKU)
    chat    the tokenizer's own chat template, with the generation prompt appended
    hh      HH-RLHF's raw "\\n\\nHuman: {u}\\n\\nAssistant:" dialogue format
    `system=None` means the template's default system line; pass "" for none (the toy task does, to keep
    sequences short).
    """
    if not turns or turns[-1]["role"] != "user":
        raise DataError("a prompt must be a non-empty list of turns ending with a user turn")
    if template == "vicuna":
        system = VICUNA_SYSTEM if system is None else system
        parts = [system] if system else []
        for t in turns:
            parts.append(f"USER: {t['content']} ASSISTANT:" if t["role"] == "user" else t["content"])
        return " ".join(parts)
    if template == "alpaca":
        system = ALPACA_SYSTEM if system is None else system
        text = f"{system}\n\n" if system else ""
        for t in turns:
            if t["role"] == "user":
                text += f"### Instruction:\n{t['content']}\n\n### Response:\n"
            else:
                text += f"{t['content']}\n\n"
        return text
    if template == "hh":
        return "".join(f"\n\n{'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}" for t in turns) \
            + "\n\nAssistant:"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("--template chat needs a tokenizer with a chat template; use vicuna or alpaca instead")
        messages = ([{"role": "system", "content": system}] if system else []) + list(turns)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # A tokenizer that adds BOS itself (Llama's; see encode_many) would double the template's textual copy:
        # drop that one. One that never adds it (GPT-2 style, whose BOS is its EOS) keeps whatever the template wrote.
        if added_bos_id(tokenizer) is not None and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token):]
        return text
    raise DataError(f"unknown --template {template!r}; choose one of {', '.join(TEMPLATES)}")


# ---------------------------------------------------------------------------------------------------------
# Tokenization: prompt + response + EOS, loss on the response and the EOS only.

def added_bos_id(tokenizer):
    """The BOS id the tokenizer puts in front of every text itself, else None. Llama's and Mistral's add one;
    Qwen2.5's has no BOS token; GPT-2's, SmolLM2's and pythia's have one (the same token as EOS) but never add it,
    so a prompt that starts with that id starts with text, not with a BOS to keep."""
    bos_id = tokenizer.bos_token_id
    return bos_id if bos_id is not None and tokenizer("", verbose=False)["input_ids"][:1] == [bos_id] else None


def truncate_prompt(prompt_ids, max_prompt_length, bos_id=None):
    """Keep the END of a prompt (the turn being answered), at most max_prompt_length ids; a leading bos_id stays
    (pass added_bos_id(tokenizer): None for a tokenizer that adds none)."""
    if len(prompt_ids) <= max_prompt_length:
        return prompt_ids
    has_bos = bos_id is not None and prompt_ids[:1] == [bos_id]
    keep = max_prompt_length - int(has_bos)
    return prompt_ids[:1] * has_bos + prompt_ids[len(prompt_ids) - keep:]


def encode_many(tokenizer, prompts, responses, max_length, max_prompt_length=None):
    """[rendered prompt text], [response text] -> [(input_ids, loss_mask)], two lists of ints of equal length
    per pair, in order.

    prompt ids   = tokenizer(prompt)                                   (the tokenizer's own BOS, if it adds one)
    response ids = tokenizer(response, add_special_tokens=False) + [eos]
    loss_mask is 1 exactly on the response ids (EOS included), 0 on the prompt.
    Too long for max_length: first keep the END of the prompt (at most max_prompt_length tokens, default
    max_length // 2, a BOS the tokenizer adds kept in front), then cut the response's tail; a cut response
    loses its EOS too, so the model is never taught to stop mid-sentence. One tokenizer call per side for many
    pairs: the same ids as one call per text, without the per-call overhead.
    """
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    # A prompt allowed to fill max_length would leave no room for the response (and made the cut below a
    # negative slice that kept tokens instead of dropping them).
    if not 0 < max_prompt_length < max_length:
        raise DataError(f"--max_prompt_length ({max_prompt_length}) must be between 1 and --max_length "
                        f"({max_length}) - 1, so that some of the response fits")
    if len(prompts) != len(responses):
        raise ValueError(f"encode_many: {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    encoded, chunk = [], 4096          # a tokenizer call's output for 288,000 rows at once took 0.5 GB more
    bos_id = added_bos_id(tokenizer)
    # verbose=False: texts longer than the tokenizer's model_max_length are cut here, so its warning that they
    # would overflow the model is wrong (and came once per tokenizer loaded)
    for start in range(0, len(prompts), chunk):
        for prompt_ids, response_ids in zip(
                tokenizer(list(prompts[start:start + chunk]), verbose=False)["input_ids"],
                tokenizer(list(responses[start:start + chunk]), add_special_tokens=False, verbose=False)["input_ids"]):
            response_ids = response_ids + [tokenizer.eos_token_id]
            if len(prompt_ids) + len(response_ids) > max_length:
                prompt_ids = truncate_prompt(prompt_ids, max_prompt_length, bos_id)
                response_ids = response_ids[:max_length - len(prompt_ids)]
            encoded.append((prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)))
    return encoded


def encode_prompts(tokenizer, prompts, max_prompt_length):
    """[rendered prompt text] -> [prompt ids], each as encode_many's prompt side (the tokenizer's own BOS, the END
    kept when longer than max_prompt_length): what generation conditions on."""
    if not prompts:
        return []
    bos_id = added_bos_id(tokenizer)
    return [truncate_prompt(ids, max_prompt_length, bos_id)
            for ids in tokenizer(list(prompts), verbose=False)["input_ids"]]


def pad_id(tokenizer):
    """The id padding uses: the tokenizer's pad token, else its EOS (Llama-style tokenizers have no pad token;
    padding is masked out anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token its EOS as one (on loading), so that tokenizer(..., padding=True)
    and pad_token_id work."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def collate(rows, pad_id):
    """[(input_ids, loss_mask), ...] -> dict of LongTensors [N, T], right-padded with pad_id.
    attention_mask is 1 on real tokens; loss_mask is 1 on scored (response) tokens and 0 on padding."""
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        loss_mask[i, :len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def encode_rows(tokenizer, rows, max_length, max_prompt_length):
    """rows [(prompt text, chosen, rejected or None)] -> (chosen encodings, rejected encodings or None)."""
    prompts = [p for p, _, _ in rows]
    chosen = encode_many(tokenizer, prompts, [c for _, c, _ in rows], max_length, max_prompt_length)
    rejected = None
    if rows and rows[0][2] is not None:
        rejected = encode_many(tokenizer, prompts, [r for _, _, r in rows], max_length, max_prompt_length)
    return chosen, rejected
