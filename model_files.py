"""Checks of a model folder's files before a library reads them: its config.json, the header of its
weights, its tokenizer files, and whether the tokenizer fits the model.

One function per rule, called by training (`model_loading.py`), extraction (`scripts/extraction.py`),
the quickstart (`--teacher_dir`) and the evaluation scripts (`eval_common.py`), so that every script
refuses the same broken file with the same `UserError`, naming the file. Nothing here loads weights
or runs code from a file: headers and JSON are read, pickles never.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from utils import UserError, one_line

# Files one of which every saved tokenizer has; a folder with none holds no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# The JSON files of a saved tokenizer, checked before loading so that an error names the file.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")
# The weights files `from_pretrained` reads from a local folder, in the order it prefers them.
WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Config sizes every model family names (through its attribute_map: DistilBERT's `n_layers` is
# `num_hidden_layers`); each must be a positive integer or the model cannot be built.
CONFIG_SIZES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
)


def read_config_json(config_file: Path, source: str | Path | None = None) -> dict:
    """config.json as a dict; a `UserError` naming the file if it cannot be read, is not JSON or not an object.

    `source` is what the user named (a folder, a flag's value), for a file that cannot be read at all.
    """
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(
            f"cannot load a model config from {source or config_file}: {e.strerror or one_line(e)}"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot load a model config from {config_file}: not valid JSON ({one_line(e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_file} must hold a JSON object, found {type(raw).__name__}")
    return raw


def check_config_sizes(config: PretrainedConfig, raw: dict | None, shown: str | Path) -> None:
    """Every size of `config` (`CONFIG_SIZES`) a positive integer, else a `UserError` naming `shown` and
    the key as the file spells it (`raw`: the file's dict, None for a Hub config)."""
    attribute_map = getattr(config, "attribute_map", {})
    for name in CONFIG_SIZES:
        value = getattr(config, name, None)
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            continue
        key = name if raw is None or name in raw else attribute_map.get(name, name)
        raise UserError(f"{shown}: '{key}' must be a positive integer, got {value!r}")


def load_folder_config(folder: Path, config_class: type[PretrainedConfig] | None = None) -> PretrainedConfig:
    """The config of a local model folder, every field of its declared type and every size positive;
    a `UserError` naming `folder/config.json` otherwise. `config_class`: the family's config class when
    the caller knows it (a config.json without `model_type` then still reads), else AutoConfig."""
    config_file = folder / "config.json"
    raw = read_config_json(config_file, folder)
    try:
        config = (config_class or AutoConfig).from_pretrained(folder)
    except StrictDataclassError as e:  # a field of the wrong type, e.g. "n_layers": "4"
        raise UserError(f"cannot load a model config from {config_file}: {one_line(e)}") from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot load a model config from {config_file}: {one_line(e)}") from None
    check_config_sizes(config, raw, config_file)
    return config


def weights_file(folder: Path) -> Path | None:
    """The weights file `from_pretrained` would read in `folder` (`WEIGHTS_FILES` order), or None."""
    return next((folder / n for n in WEIGHTS_FILES if (folder / n).is_file()), None)


def check_weights_header(weights: Path, shown: str | Path) -> None:
    """Refuse a safetensors file (or a shard of a safetensors index) whose header does not cover the
    file: a file cut short or garbled. Reads headers only; `shown` is the model as the user named it."""
    if weights.name == "model.safetensors.index.json":
        try:
            index = json.loads(weights.read_text(encoding="utf-8"))
            shards = sorted({str(v) for v in index["weight_map"].values()})
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(
                f"cannot load model {shown}: {weights} is not a safetensors index ({one_line(e)})"
            ) from None
        files = [weights.parent / shard for shard in shards]
    elif weights.suffix == ".safetensors":
        files = [weights]
    else:
        return
    for path in files:
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as e:  # SafetensorError, OSError: the file is not what its name says
            raise UserError(f"cannot load model {shown}: {path} is truncated or corrupt ({one_line(e)})") from None


def weights_problem(weights: Path | None, error: Exception) -> str | None:
    """What a failed `from_pretrained` says about the weights file, or None if it is not about them.

    A pickled .bin is read with `weights_only=True`: a file holding more than tensors fails to
    unpickle, and is named so; a .bin that is not a torch.save archive is cut short or garbled.
    """
    if isinstance(error, pickle.UnpicklingError):
        return f"{weights or 'its pytorch_model.bin'} is corrupt or holds more than tensors (read as data only)"
    if weights is not None and weights.suffix == ".bin" and not zipfile.is_zipfile(weights):
        return f"{weights} is truncated or corrupt (not a torch.save archive)"
    return None


def check_tokenizer_files(folder: Path, missing_hint: str) -> None:
    """Refuse a folder with no tokenizer file (`missing_hint` says what to do), or whose tokenizer JSON
    files are not JSON (naming the file): the library would build an empty tokenizer or not say which file."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"no tokenizer files in {folder} ({', '.join(TOKENIZER_FILES[:3])}, ...): {missing_hint}")
    for path in (folder / name for name in TOKENIZER_JSON_FILES):
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot load a tokenizer from {path}: not valid JSON ({one_line(e)})") from None
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or one_line(e)}") from None


def check_vocab_size(tokenizer, config: PretrainedConfig) -> None:
    """Raise a `UserError` if the tokenizer has ids the model has no embedding for."""
    if len(tokenizer) > config.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size}"
        )


def check_same_padding(tokenizer, config: PretrainedConfig, shown: str | Path) -> None:
    """Raise a `UserError` if config.json names a padding id and the tokenizer pads with another: the
    tokenizer is another model's (a BERT tokenizer beside a RoBERTa model, say), and every id would
    mean another word. Only the padding id is compared: chat models often give other end ids."""
    declared = getattr(config, "pad_token_id", None)
    own = tokenizer.pad_token_id
    if isinstance(declared, int) and not isinstance(declared, bool) and own is not None and own != declared:
        raise UserError(
            f"the tokenizer of {shown} is another model's: it pads with id {own} ({tokenizer.pad_token!r}), "
            f"config.json's pad_token_id is {declared}; save the model's own tokenizer beside it"
        )


def check_tokenizer_fits(tokenizer, config: PretrainedConfig, shown: str | Path) -> None:
    """The tokenizer belongs to the model: no id beyond its vocabulary, the padding id it declares."""
    check_vocab_size(tokenizer, config)
    check_same_padding(tokenizer, config, shown)


def check_model_folder(
    folder: Path, tokenizer_hint: str | None, config_class: type[PretrainedConfig] | None = None
) -> PretrainedConfig:
    """Every file of a local model folder that can be checked without loading the model: config.json
    (JSON, typed fields, sizes; read with `config_class` if given), the weights' headers and, unless
    `tokenizer_hint` is None, the tokenizer files (`tokenizer_hint`: what to do when there are none).
    Returns the config."""
    config = load_folder_config(folder, config_class)
    weights = weights_file(folder)
    if weights is not None:
        check_weights_header(weights, folder)
    if tokenizer_hint is not None:
        check_tokenizer_files(folder, tokenizer_hint)
    return config
