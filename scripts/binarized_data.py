"""Tokenize a text corpus once and store it as token ids (the input of causal_train.py).

    python scripts/binarized_data.py --file_path data/wikitext-15M --split train --field_name text \
        --tokenizer_type bert --tokenizer_name bert-base-uncased --dump_file data/binarized_text

Each example becomes ``[CLS] text [SEP]`` (bert), ``<s> text </s>`` (roberta),
``<|endoftext|> text <|endoftext|>`` (gpt2), ``bos text eos`` (llama, mistral, gemma) or
``text eos`` (qwen2, qwen3: no start token) ids, the framing of the family's row in
architectures.py: like the original, the string ``f"{start} {text.strip()} {end}"`` is encoded without adding
special tokens, so the ids are the original pipeline's. Empty and whitespace-only lines are kept (as
``[CLS] [SEP]``), as there; the training set drops them with every other sequence of 11 tokens or fewer.
The corpus is shuffled with --seed and written, atomically, to ``{dump_file}.{split}.{tokenizer}.pickle``
(a list of arrays: uint16 ids for vocabularies under 65,536, else int32), or with --format memmap to ``.tokens.npy`` +
``.offsets.npy``. The output is checked to be writable before any work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...`: find the repo's modules

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from architectures import teacher_types, tokenizer_framing  # noqa: E402
from token_store import (  # noqa: E402
    TOKENS_SUFFIX,
    TokenSequences,
    check_writable,
    new_folders,
    offsets_path_for,
    save_sequences,
    token_dtype,
)
from utils import UserError, run_cli  # noqa: E402

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("binarized_data")

# --tokenizer_type -> (tokenizer class in transformers, start token attribute or None, end token
# attribute), read from the architecture table so that binarization and the training set frame
# sequences with the same tokens. Qwen tokenizers define no start token: their lines end with eos.
TOKENIZER_TYPES = {family: tokenizer_framing(family) for family in teacher_types()}
# A folder holds a tokenizer if it has one of these file sets (tokenizer.json, or the older per-model files).
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"))
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
]
# Hub names that the original expanded to a configuration
HUB_CONFIGS = {"wikitext": ("wikitext", "wikitext-103-v1")}
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
BATCH_SIZE = 1000  # examples per tokenizer call (fast path) and per read (line-by-line path)


# --- names ---------------------------------------------------------------------------------


def safe_tokenizer_name(name: str) -> str:
    """File-name form of a tokenizer name: a local folder's own name, else the Hub name with '/' -> '-'.

    ``/models/bert-base-uncased/`` -> ``bert-base-uncased``; ``google/bert_uncased_L-2_H-128_A-2``
    -> ``google-bert_uncased_L-2_H-128_A-2``; ``bert-base-uncased`` stays as it is.
    """
    if os.path.isdir(name):
        return Path(name).resolve().name
    return name.strip("/").replace("/", "-")


def output_path(dump_file: str, split: str, tokenizer_name: str, fmt: str) -> Path:
    """``{dump_file}.{split}.{tokenizer}.pickle`` (or ``.tokens.npy`` for the memory-mapped store)."""
    suffix = TOKENS_SUFFIX if fmt == "memmap" else ".pickle"
    return Path(f"{dump_file}.{split}.{safe_tokenizer_name(tokenizer_name)}{suffix}")


def shuffled(store: TokenSequences, seed: int) -> TokenSequences:
    """The corpus in a seeded random order (the original shuffled with an unseeded `random.shuffle`)."""
    return store.permuted(np.random.default_rng(seed).permutation(len(store)))


# --- tokenizer -----------------------------------------------------------------------------


def tokenizer_folder(name: str, cache_dir: str | None) -> Path:
    """A local folder holding the tokenizer `name` (a folder, or a Hub name downloaded into the cache)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        if name.startswith((".", "/", "~")) or name.count("/") > 1:  # not a Hub id ("name" or "org/name")
            raise UserError(f"tokenizer folder not found: {name}")
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name, allow_patterns=TOKENIZER_FILES, cache_dir=cache_dir))
        except (OSError, ValueError) as e:  # offline, unknown repo, invalid name
            raise UserError(
                f"cannot get tokenizer {name!r}: no such local folder, and from the Hugging Face Hub: "
                f"{str(e).splitlines()[0]}"
            ) from None
    if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILE_SETS):
        raise UserError(
            f"tokenizer folder {path} holds no tokenizer files (expected tokenizer.json, vocab.txt, "
            "or vocab.json + merges.txt)"
        )
    return path


def declared_added_tokens(folder: Path) -> set[str]:
    """Tokens the folder's tokenizer.json declares as added tokens (Llama-3-style special tokens live
    there, above the model vocabulary, rather than in it)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return set()
    try:
        return {t["content"] for t in json.loads(path.read_text()).get("added_tokens") or []}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"tokenizer file {path} is corrupt: {e}") from None


def load_tokenizer(
    kind: str, name: str, cache_dir: str | None = None
) -> tuple[PreTrainedTokenizerBase, str | None, str]:
    """The tokenizer and its (start, end) tokens for --tokenizer_type `kind`."""
    import transformers

    class_name, start_attr, end_attr = TOKENIZER_TYPES[kind]
    folder = tokenizer_folder(name, cache_dir)
    declared = declared_added_tokens(folder)
    try:
        tokenizer = getattr(transformers, class_name).from_pretrained(str(folder))
    except Exception as e:  # the Rust tokenizers library raises a plain Exception for a file it cannot parse
        raise UserError(f"cannot load tokenizer {name}: {first_line(e)}") from None
    # Binarization keeps long lines whole (the training set cuts them): no length warning.
    tokenizer.model_max_length = sys.maxsize
    backend = tokenizer.backend_tokenizer
    model_vocab = backend.get_vocab_size(with_added_tokens=False)
    tokens = {attr: getattr(tokenizer, attr) for attr in (start_attr, end_attr) if attr is not None}
    for attr, token in tokens.items():
        # A token the folder does not define was added by the class default: the wrong --tokenizer_type.
        token_id = backend.token_to_id(str(token)) if token is not None else None
        if token_id is None or (token_id >= model_vocab and str(token) not in declared):
            raise UserError(
                f"tokenizer {name} defines no {attr} ({token}) in its vocabulary: "
                f"is --tokenizer_type {kind} right for it?"
            )
    start = None if start_attr is None else str(tokens[start_attr])
    end = str(tokens[end_attr])
    ids = tokenizer.encode(frame("x", start, end), add_special_tokens=False)
    if (start is not None and ids[0] != backend.token_to_id(start)) or ids[-1] != backend.token_to_id(end):
        raise UserError(f"tokenizer {name} splits {start!r} / {end!r} into pieces: they are not special tokens there")
    return tokenizer, start, end


def first_line(e: BaseException) -> str:
    """The innermost cause's first line: `datasets` wraps a parse error in "An error occurred while
    generating the dataset", which names neither the file nor the problem."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def frame(text: str | None, start: str | None, end: str) -> str:
    """The string the original encoded for one example (without a start token: text and end)."""
    body = (text or "").strip()
    return f"{body} {end}" if start is None else f"{start} {body} {end}"


# --- text ----------------------------------------------------------------------------------


def load_from_file_path(path: Path, split: str, cache_dir: str | None) -> datasets.Dataset:
    import datasets

    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{path} is not a dataset saved with save_to_disk: {e}") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise UserError(f"split {split!r} not in {path}; available: {', '.join(data)}")
            data = data[split]
        return data
    if not path.is_file():
        raise UserError(f"--file_path not found: {path}")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(
            f"unsupported file type {path.suffix!r} for {path}: use .txt, .json, .jsonl, .csv or a save_to_disk folder"
        )
    if path.stat().st_size == 0:
        raise UserError(f"the corpus is empty: {path} has no lines")
    kwargs = {"keep_linebreaks": False} if builder == "text" else {}
    try:
        # A plain file has no splits: --split only names the output.
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)
    except Exception as e:  # parse errors come from pyarrow, json and pandas in many types
        raise UserError(f"cannot read {path}: {first_line(e)}") from None


def load_from_hub(names: str, split: str, field: str, cache_dir: str | None) -> datasets.Dataset:
    import datasets

    parts = []
    for name in names.split("+"):
        hub_name, config = HUB_CONFIGS.get(name, (name, None))
        try:
            data = datasets.load_dataset(hub_name, config, cache_dir=cache_dir)
        except Exception as e:  # offline, unknown name, gated dataset, ... (raised by several libraries)
            raise UserError(
                f"cannot load dataset {name!r} from the Hugging Face Hub: {str(e).splitlines()[0]}"
            ) from None
        if split not in data:
            raise UserError(f"split {split!r} not in dataset {name!r}; available: {', '.join(data)}")
        data = data[split]
        if field not in data.column_names:
            raise UserError(f"field {field!r} not in dataset {name!r}; available: {', '.join(data.column_names)}")
        parts.append(data.select_columns([field]))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def load_texts(args: argparse.Namespace) -> datasets.Dataset:
    """The corpus as a `datasets.Dataset` holding only the --field_name column, capped by --max_parsing_example."""
    if (args.file_path is None) == (args.dataset_name is None):
        raise UserError("give exactly one of --file_path and --dataset_name")
    if args.max_parsing_example is not None and (args.max_parsing_example == 0 or args.max_parsing_example < -1):
        raise UserError(f"--max_parsing_example must be a positive number or -1 (all), got {args.max_parsing_example}")
    if args.file_path is not None:
        data = load_from_file_path(Path(args.file_path), args.split, args.cache_dir)
        source = args.file_path
    else:
        data = load_from_hub(args.dataset_name, args.split, args.field_name, args.cache_dir)
        source = args.dataset_name
    if args.field_name not in data.column_names:
        raise UserError(f"field {args.field_name!r} not in {source}; available: {', '.join(data.column_names)}")
    dtype = getattr(data.features[args.field_name], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise UserError(f"field {args.field_name!r} of {source} holds {data.features[args.field_name]}, not text")
    data = data.select_columns([args.field_name])
    if args.max_parsing_example not in (None, -1):
        data = data.select(range(min(args.max_parsing_example, len(data))))
    if len(data) == 0:
        raise UserError(f"the corpus is empty: {source} has no examples")
    if not any(t and t.strip() for batch in data.iter(BATCH_SIZE) for t in batch[args.field_name]):
        raise UserError(f"the corpus is empty: all {len(data)} examples of {source} are blank")
    return data


# --- encoding ------------------------------------------------------------------------------


def encode_slow(
    data: datasets.Dataset, field: str, tokenizer: PreTrainedTokenizerBase, start: str, end: str, dtype: np.dtype
) -> TokenSequences:
    """One `tokenizer.encode` call per line, as the original did."""
    flats, lengths = [], []
    with tqdm(total=len(data), desc="tokenizing", unit=" lines", mininterval=2) as bar:
        for batch in data.iter(BATCH_SIZE):
            ids = [tokenizer.encode(frame(t, start, end), add_special_tokens=False) for t in batch[field]]
            flats.append(np.fromiter((i for seq in ids for i in seq), dtype=dtype))
            lengths.extend(map(len, ids))
            bar.update(len(ids))
    return from_lengths(np.concatenate(flats), np.asarray(lengths, dtype=np.int64))


def encode_fast(
    data: datasets.Dataset,
    field: str,
    tokenizer: PreTrainedTokenizerBase,
    start: str,
    end: str,
    num_workers: int | None,
    dtype: np.dtype,
    work_dir: str | os.PathLike,
) -> TokenSequences:
    """Batches of lines through the Rust tokenizer with `datasets.map` in `num_workers` processes.

    The ids are stored as Arrow lists of `dtype` under `work_dir` (not beside the input dataset,
    where `map` would otherwise cache them) and read back as one flat array, never as Python lists.
    """
    import datasets
    import pyarrow.compute as pc

    backend = tokenizer.backend_tokenizer
    # A tokenizer.json may carry the training-time truncation (e.g. 128); the original kept whole lines.
    backend.no_truncation()
    backend.no_padding()

    def encode(batch: dict) -> dict:
        encodings = backend.encode_batch_fast([frame(t, start, end) for t in batch[field]], add_special_tokens=False)
        return {"input_ids": [e.ids for e in encodings]}

    encoded = data.map(
        encode,
        batched=True,
        batch_size=BATCH_SIZE,
        num_proc=num_workers if (num_workers or 1) > 1 else None,
        remove_columns=[field],
        features=datasets.Features({"input_ids": datasets.List(datasets.Value(dtype.name))}),
        cache_file_name=str(Path(work_dir) / "input_ids.arrow"),
        load_from_cache_file=False,
        desc="tokenizing",
    )
    column = encoded.data.column("input_ids")
    # Chunk by chunk: one Arrow list array has 32-bit offsets, a large corpus has more tokens than that.
    flat = np.concatenate([chunk.flatten().to_numpy() for chunk in column.chunks])
    lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
    return from_lengths(flat, lengths)


def from_lengths(flat: np.ndarray, lengths: np.ndarray) -> TokenSequences:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenSequences(flat, offsets)


# --- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Binarize a text corpus into token ids.")
    p.add_argument(
        "--file_path",
        type=str,
        default=None,
        help="A dataset saved with save_to_disk, or a .txt (one example per line) / .json / .jsonl / .csv file.",
    )
    p.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Hub dataset name(s) joined with '+', concatenated (wikitext = wikitext-103-v1).",
    )
    p.add_argument("--split", type=str, default="train", help="Split to read; also part of the output name.")
    p.add_argument("--field_name", type=str, default="text", help="Column holding the text.")
    p.add_argument("--max_parsing_example", type=int, default=-1, help="Read at most the first N examples (-1: all).")
    p.add_argument(
        "--tokenizer_type",
        type=str,
        default="bert",
        choices=sorted(TOKENIZER_TYPES),
        help="Framing: bert [CLS]..[SEP], roberta <s>..</s>, gpt2 <|endoftext|>..<|endoftext|>; "
        "llama/mistral/gemma bos..eos, qwen2/qwen3 text..eos (no start token).",
    )
    p.add_argument("--tokenizer_name", type=str, default="bert-base-uncased", help="Hub name or local folder.")
    p.add_argument("--dump_file", type=str, default="data/dump", help="Output prefix.")
    p.add_argument("--cache_dir", type=str, default=None, help="Cache folder for Hub downloads.")
    p.add_argument(
        "--fast_process",
        action="store_true",
        help="Batched Rust tokenization through datasets.map (same ids as line by line).",
    )
    p.add_argument(
        "--preprocessing_num_workers",
        type=int,
        default=None,
        help="Processes for --fast_process (default: one; its tokenizer already uses every core).",
    )
    p.add_argument("--seed", type=int, default=56, help="Seed of the shuffle.")
    p.add_argument(
        "--format",
        choices=["pickle", "memmap"],
        default="pickle",
        help="pickle: the original list of arrays; memmap: flat .tokens.npy + .offsets.npy.",
    )
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.preprocessing_num_workers is not None and args.preprocessing_num_workers < 1:
        raise UserError(f"--preprocessing_num_workers must be at least 1, got {args.preprocessing_num_workers}")
    if args.seed < 0:
        raise UserError(f"--seed must be a non-negative number, got {args.seed}")
    started = time.time()
    out = output_path(args.dump_file, args.split, args.tokenizer_name, args.format)
    for path in (out, offsets_path_for(out)) if args.format == "memmap" else (out,):
        check_writable(path, "--dump_file")
    tokenizer, start, end = load_tokenizer(args.tokenizer_type, args.tokenizer_name, args.cache_dir)
    data = load_texts(args)
    dtype = token_dtype(len(tokenizer))
    logger.info(
        "Tokenizing %d examples of %r (%s, %s ... %s, %s ids) %s",
        len(data),
        args.field_name,
        args.tokenizer_name,
        start,
        end,
        dtype,
        f"in batches, {args.preprocessing_num_workers or 1} process(es)" if args.fast_process else "line by line",
    )
    with new_folders(out.parent):  # removed again if anything below fails
        try:
            with tempfile.TemporaryDirectory(prefix=".binarize-", dir=out.parent) as work_dir:
                if args.fast_process:
                    store = encode_fast(
                        data, args.field_name, tokenizer, start, end, args.preprocessing_num_workers, dtype, work_dir
                    )
                else:
                    store = encode_slow(data, args.field_name, tokenizer, start, end, dtype)
                store = shuffled(store, args.seed)  # a copy: nothing refers to the Arrow files after this
        except OSError as e:  # the Arrow work files of --fast_process: no space left, file too large
            raise UserError(
                f"cannot write work files in {out.parent}: {e.strerror or first_line(e)}; nothing was written"
            ) from None
        if out.exists():
            logger.info("Replacing %s", out)
        save_sequences(store, out)
    logger.info(
        "%d sequences, %d tokens (mean length %.1f), %s -> %s in %.1fs",
        len(store),
        store.n_tokens,
        store.n_tokens / len(store),
        dtype,
        out,
        time.time() - started,
    )
    return out


if __name__ == "__main__":
    run_cli(main)
