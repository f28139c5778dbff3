"""The descriptive general.* keys of a GGUF from an HF directory: the README's YAML front matter
(the model card) and config.json's `_name_or_path`, through gguf-py's naming heuristics as
llama.cpp's converter applies them.

gguf-py's own loader reads these files without a bound, stops with a YAML traceback on a broken
card, and passes a number through where a string belongs (the writer then fails). A model card
is documentation: a broken one costs its metadata and a warning, never the conversion.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import yaml

from quant.files import InputFileError, read_text

from ..meta import MB, describe

README_BYTES = 4 * MB
# The card keys gguf-py's heuristics read, by the shape they must have
TEXT_KEYS = (
    "name", "author", "version", "organization", "description", "finetune", "basename", "size_label", "url", "doi",
    "uuid", "repo_url", "model_name", "model_author", "model_version", "model_organization", "model_description",
    "model_finetune", "model_basename", "model_size_label", "model_url", "model_doi", "model_uuid",
    "model_repo_url", "model_creator", "model_type", "license_name", "license_link",
)
TEXT_LIST_KEYS = ("license", "tags", "pipeline_tag", "languages", "language")  # a string or a list of strings
ENTRY_KEYS = ("base_model", "base_models", "base_model_sources", "datasets", "dataset", "dataset_sources")
ENTRY_FIELDS = ("name", "author", "version", "organization", "description", "url", "doi", "uuid", "repo_url")


def read_model_card(directory: Path) -> tuple[dict[str, Any], list[str]]:
    """The README's front matter, reduced to the keys gguf-py uses in the shapes it handles, and
    a warning for each thing left out."""
    path = Path(directory) / "README.md"
    if not os.path.lexists(path):
        return {}, []
    try:
        text = read_text(path, README_BYTES, "model card")
    except InputFileError as e:
        return {}, [f"{e}; the model card is not used"]
    lines = text.splitlines()
    if not lines or lines[0] != "---":
        return {}, []  # no front matter: nothing to read
    body = []
    for line in lines[1:]:
        if line == "---":
            break
        body.append(line)
    # gguf-py's two repairs, so a card reads as it does for llama.cpp: YAML 1.1's `no` is false
    # (the Norwegian language tag), and tabs are not YAML indentation
    source = ("\n".join(body) + "\n").replace("- no\n", '- "no"\n').replace("\t", "  ")
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 2}: " if mark is not None else ""
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        return {}, [f"{path}: the model card's YAML front matter is malformed ({where}{why}); it is not used"]
    except RecursionError:
        return {}, [f"{path}: the model card's YAML front matter is nested too deeply; it is not used"]
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        return {}, [f"{path}: the model card's front matter is {describe(data)}, not a mapping; it is not used"]
    return _sanitized(data, path)


def _sanitized(data: dict, path: Path) -> tuple[dict[str, Any], list[str]]:
    card: dict[str, Any] = {}
    bad: list[str] = []
    for key in TEXT_KEYS:
        v = data.get(key)
        if isinstance(v, str):
            card[key] = v
        elif v is not None:
            bad.append(f"{key} ({describe(v)}, not a string)")
    for key in TEXT_LIST_KEYS:
        v = data.get(key)
        if isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            card[key] = v
        elif v is not None:
            bad.append(f"{key} ({describe(v)}, not a string or a list of strings)")
    for key in ENTRY_KEYS:
        v = data.get(key)
        if v is None:
            continue
        items = [v] if isinstance(v, (str, dict)) else v if isinstance(v, list) else None
        entries = [] if items is not None else None
        for item in items or []:
            if isinstance(item, str):
                entries.append(item)
            elif isinstance(item, dict) and all(isinstance(item.get(k, ""), str) for k in ENTRY_FIELDS):
                entries.append({k: item[k] for k in ENTRY_FIELDS if k in item})
            else:
                entries = None
                break
        if entries is None:
            bad.append(f"{key} ({describe(v)}, not model or dataset names)")
        else:
            card[key] = entries
    warnings = [f"{path}: model card key {b} is not used" for b in bad]
    return card, warnings


def card_metadata(directory: Path, config: dict[str, Any], n_params: tuple[int, ...],
                  sampling: dict[str, Any]) -> tuple[gguf.Metadata, list[str]]:
    """gguf-py's Metadata for the directory, from checked inputs only (its Metadata.load would
    read the files itself); `sampling` holds checked generation_config values by field name."""
    card, warnings = read_model_card(directory)
    name_or_path = config.get("_name_or_path")
    params = {"_name_or_path": name_or_path} if isinstance(name_or_path, str) else {}
    if name_or_path is not None and not params:
        warnings.append(f"{Path(directory) / 'config.json'}: _name_or_path is {describe(name_or_path)}, "
                        "not a string; it is not used")
    meta = gguf.Metadata()
    for name, value in sampling.items():
        setattr(meta, f"sampling_{name}", value)
    meta = gguf.Metadata.apply_metadata_heuristic(meta, card, params, Path(directory), n_params[0])
    return meta, warnings
