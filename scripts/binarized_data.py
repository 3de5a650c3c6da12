"""Tokenize a text corpus once and store it as token ids (the input of causal_train.py).

    python scripts/binarized_data.py --file_path data/wikitext-15M --split train --field_name text \
        --tokenizer_type bert --tokenizer_name bert-base-uncased --dump_file data/binarized_text

Each example becomes ``[CLS] text [SEP]`` (bert), ``<s> text </s>`` (roberta) or
``<|endoftext|> text <|endoftext|>`` (gpt2) ids, exactly as the original encoded
``f"{bos} {text.strip()} {sep}"``. The list is shuffled with --seed and written to
``{dump_file}.{split}.{tokenizer_name}.pickle`` (or ``.tokens.npy`` with --format memmap).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from token_store import TOKENS_SUFFIX, TokenSequences, save_sequences, token_dtype  # noqa: E402
from utils import UserError, run_cli  # noqa: E402

logger = logging.getLogger("binarized_data")

# tokenizer type -> (start token attribute, end token attribute), as in the original
FRAMING = {"bert": ("cls_token", "sep_token"), "roberta": ("cls_token", "sep_token"), "gpt2": ("bos_token", "eos_token")}
# Hub names that the original expanded to a configuration
HUB_CONFIGS = {"wikitext": ("wikitext", "wikitext-103-v1")}
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def safe_tokenizer_name(name: str) -> str:
    """File-name form of a tokenizer name: a local folder's base name, or the Hub name with '/' -> '-'."""
    if os.path.isdir(name):
        return Path(name).resolve().name
    return name.strip("/").replace("/", "-")


def output_path(dump_file: str, split: str, tokenizer_name: str, fmt: str) -> Path:
    suffix = TOKENS_SUFFIX if fmt == "memmap" else ".pickle"
    return Path(f"{dump_file}.{split}.{safe_tokenizer_name(tokenizer_name)}{suffix}")


def load_texts(args: argparse.Namespace):
    """The corpus as a `datasets.Dataset` with the `--field_name` column."""
    import datasets

    if (args.file_path is None) == (args.dataset_name is None):
        raise UserError("give exactly one of --file_path and --dataset_name")
    if args.file_path is not None:
        path = Path(args.file_path)
        if path.is_dir():
            try:
                data = datasets.load_from_disk(str(path))
            except (FileNotFoundError, ValueError) as e:
                raise UserError(f"{path} is not a dataset saved with save_to_disk: {e}") from None
            if isinstance(data, datasets.DatasetDict):
                if args.split not in data:
                    raise UserError(f"split {args.split!r} not in {path}; available: {', '.join(data)}")
                data = data[args.split]
        elif path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"unsupported file type {path.suffix!r} for {path}: use .txt, .json, .jsonl or .csv")
            kwargs = {"keep_linebreaks": False} if builder == "text" else {}
            try:
                data = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=args.cache_dir,
                                             **kwargs)
            except Exception as e:  # pyarrow/json parse errors come in many types
                raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        else:
            raise UserError(f"--file_path not found: {path}")
    else:
        parts = []
        for name in args.dataset_name.split("+"):
            hub_name, config = HUB_CONFIGS.get(name, (name, None))
            try:
                parts.append(datasets.load_dataset(hub_name, config, split=args.split, cache_dir=args.cache_dir))
            except Exception as e:  # offline, unknown name, unknown split...
                raise UserError(f"cannot load dataset {name!r} split {args.split!r}: {str(e).splitlines()[0]}") from None
        data = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if args.field_name not in data.column_names:
        raise UserError(f"field {args.field_name!r} not in the data; available: {', '.join(data.column_names)}")
    data = data.select_columns([args.field_name])
    if args.max_parsing_example is not None and args.max_parsing_example >= 0:
        data = data.select(range(min(args.max_parsing_example, len(data))))
    if len(data) == 0:
        raise UserError("the corpus is empty")
    return data


def load_tokenizer(args: argparse.Namespace):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, cache_dir=args.cache_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {args.tokenizer_name!r}: {str(e).splitlines()[0]}") from None
    start, end = (getattr(tokenizer, attr) for attr in FRAMING[args.tokenizer_type])
    if start is None or end is None:
        raise UserError(f"tokenizer {args.tokenizer_name} has no {'/'.join(FRAMING[args.tokenizer_type])} token: "
                        f"is --tokenizer_type {args.tokenizer_type} right?")
    return tokenizer, str(start), str(end)


def framed(texts: list, bos: str, sep: str) -> list[str]:
    return [f"{bos} {(t or '').strip()} {sep}" for t in texts]


def encode_slow(data, field: str, tokenizer, bos: str, sep: str, dtype: np.dtype) -> TokenSequences:
    """One line at a time, as the original did."""
    ids = [
        np.asarray(tokenizer.encode(framed([row[field]], bos, sep)[0], add_special_tokens=False), dtype=dtype)
        for row in tqdm(data, desc="tokenizing", unit="lines", mininterval=2)
    ]
    return TokenSequences.from_list(ids, dtype=dtype)


def encode_fast(data, field: str, tokenizer, bos: str, sep: str, num_proc: int, dtype: np.dtype) -> TokenSequences:
    """Batched through the Rust tokenizer, in `num_proc` processes with datasets.map.

    The ids are read back from Arrow as one flat array + offsets, never as Python lists.
    """

    def encode(batch):
        return {"ids": tokenizer(framed(batch[field], bos, sep), add_special_tokens=False)["input_ids"]}

    encoded = data.map(encode, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                       remove_columns=[field], desc="tokenizing")
    column = encoded.data.column("ids").combine_chunks()
    flat = column.flatten().to_numpy().astype(dtype, copy=False)
    offsets = column.offsets.to_numpy().astype(np.int64)
    return TokenSequences(flat, offsets - offsets[0])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Binarize a text corpus into token ids.")
    p.add_argument("--file_path", type=str, default=None,
                   help="A dataset saved with save_to_disk, or a .txt (one example per line) / .json / .jsonl / .csv file.")
    p.add_argument("--dataset_name", type=str, default=None,
                   help="Hub dataset name(s) joined with '+' (wikitext = wikitext-103-v1).")
    p.add_argument("--split", type=str, default="train", help="Split to read; also part of the output name.")
    p.add_argument("--field_name", type=str, default="text", help="Column holding the text.")
    p.add_argument("--max_parsing_example", type=int, default=-1, help="Read at most this many examples (-1: all).")
    p.add_argument("--tokenizer_type", type=str, default="bert", choices=sorted(FRAMING))
    p.add_argument("--tokenizer_name", type=str, default="bert-base-uncased", help="Hub name or local folder.")
    p.add_argument("--dump_file", type=str, default="data/dump", help="Output prefix.")
    p.add_argument("--cache_dir", type=str, default=None, help="Cache folder for Hub downloads.")
    p.add_argument("--fast_process", action="store_true", help="Batched tokenization with datasets.map.")
    p.add_argument("--preprocessing_num_workers", type=int, default=1, help="Processes for --fast_process.")
    p.add_argument("--seed", type=int, default=56, help="Seed of the shuffle.")
    p.add_argument("--format", choices=["pickle", "memmap"], default="pickle",
                   help="pickle: the original list of arrays; memmap: flat .tokens.npy + .offsets.npy.")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    start_time = time.time()
    tokenizer, bos, sep = load_tokenizer(args)
    data = load_texts(args)
    logger.info("Tokenizing %d examples of field %r (%s path)", len(data), args.field_name,
                "fast" if args.fast_process else "line-by-line")
    dtype = token_dtype(len(tokenizer))
    if args.fast_process:
        store = encode_fast(data, args.field_name, tokenizer, bos, sep, args.preprocessing_num_workers, dtype)
    else:
        store = encode_slow(data, args.field_name, tokenizer, bos, sep, dtype)
    shuffled = store.permuted(np.random.default_rng(args.seed).permutation(len(store)))
    out = output_path(args.dump_file, args.split, args.tokenizer_name, args.format)
    save_sequences(shuffled, out)
    logger.info("%d sequences, %d tokens (%s) -> %s in %.1fs", len(shuffled), shuffled.n_tokens, dtype, out,
                time.time() - start_time)
    return out


if __name__ == "__main__":
    run_cli(main)
