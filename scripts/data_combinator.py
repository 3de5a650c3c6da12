"""Concatenate two binarized corpora, shuffle, and write one (e.g. WikiText + BookCorpus).

    python scripts/data_combinator.py \
        --file_path_left bookcorpus-dataset/binarized_text.train.bert-base-uncased.pickle \
        --file_path_right wikitext-dataset/binarized_text.train.bert-base-uncased.pickle \
        --split train --tokenizer_name bert-base-uncased --dump_file wikitext+bookcorpus-dataset/binarized_text

Either input may be a pickle or a memory-mapped store. Both must come from the same tokenizer:
sequences framed by different start/end ids are refused. Ids of different widths (uint16 and
int32, or any other integer dtypes) are written in the wider type, with a warning. The output is named as
binarized_data.py names its own: ``{dump_file}.{split}.{tokenizer_name}.pickle`` (or ``.tokens.npy``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...`: find the repo's modules

import numpy as np  # noqa: E402

from scripts.binarized_data import output_path, shuffled  # noqa: E402
from token_store import (  # noqa: E402
    OFFSETS_SUFFIX,
    TOKENS_SUFFIX,
    TokenSequences,
    cast_ids,
    check_writable,
    common_dtype,
    load_sequences,
    save_sequences,
)
from utils import UserError, run_cli  # noqa: E402

logger = logging.getLogger("data_combinator")


def framing(store: TokenSequences) -> tuple[int, int]:
    """The most common first and last id of the non-empty sequences (CLS/SEP, BOS/EOS)."""
    nonempty = store.lengths > 0
    firsts = store.flat[store.offsets[:-1][nonempty]]
    lasts = store.flat[store.offsets[1:][nonempty] - 1]
    return tuple(int(np.bincount(ids.astype(np.int64)).argmax()) for ids in (firsts, lasts))


def check_compatible(left: TokenSequences, right: TokenSequences, left_path: str, right_path: str) -> np.dtype:
    """The dtype of the combined ids; refuses corpora that are empty or framed by different tokenizers."""
    for store, path in ((left, left_path), (right, right_path)):
        if store.n_tokens == 0:
            raise UserError(f"{path} holds no tokens")
        if int(store.flat.min()) < 0:
            raise UserError(f"{path} holds negative token ids")
    left_frame, right_frame = framing(left), framing(right)
    if left_frame != right_frame:
        raise UserError(
            f"{left_path} frames its sequences with ids {left_frame} and {right_path} with "
            f"{right_frame} (start, end): they were binarized with different tokenizers"
        )
    dtype = common_dtype([left.flat.dtype, right.flat.dtype])
    if left.flat.dtype != right.flat.dtype:
        logger.warning(
            "%s holds %s ids and %s %s ids: writing %s. Files binarized by this project with one "
            "tokenizer share a dtype, so check that both used the same vocabulary.",
            left_path,
            left.flat.dtype,
            right_path,
            right.flat.dtype,
            dtype,
        )
    return dtype


def combine(left: TokenSequences, right: TokenSequences, seed: int, dtype: np.dtype) -> TokenSequences:
    """Both corpora in one corpus, shuffled with `seed`."""
    both = TokenSequences(
        np.concatenate([cast_ids(left.flat, dtype), cast_ids(right.flat, dtype)]),
        np.concatenate([left.offsets, right.offsets[1:] + left.offsets[-1]]),
    )
    return shuffled(both, seed)


def same_file(a: Path, b: str) -> bool:
    return a.exists() and Path(b).exists() and a.resolve() == Path(b).resolve()


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="Combine two binarized corpora into one shuffled corpus.")
    p.add_argument("--file_path_left", type=str, required=True, help="First binarized corpus (.pickle / .tokens.npy).")
    p.add_argument("--file_path_right", type=str, required=True, help="Second binarized corpus.")
    p.add_argument("--split", type=str, default="train", help="Split name used in the output name.")
    p.add_argument(
        "--tokenizer_name",
        type=str,
        default="bert-base-uncased",
        help="Tokenizer name used in the output name (a local folder contributes its folder name).",
    )
    p.add_argument("--dump_file", type=str, default="data/dump", help="Output prefix.")
    p.add_argument("--seed", type=int, default=56, help="Seed of the shuffle.")
    p.add_argument("--format", choices=["pickle", "memmap"], default="pickle", help="Output format.")
    args = p.parse_args(argv)
    if args.seed < 0:
        raise UserError(f"--seed must be a non-negative number, got {args.seed}")
    out = output_path(args.dump_file, args.split, args.tokenizer_name, args.format)
    companion = out.with_name(out.name[: -len(TOKENS_SUFFIX)] + OFFSETS_SUFFIX) if args.format == "memmap" else out
    for given in (args.file_path_left, args.file_path_right):
        if same_file(out, given) or same_file(companion, given):
            raise UserError(f"the output {out} would overwrite the input {given}: choose another --dump_file")
    for path in (out, companion):
        check_writable(path, "--dump_file")
    left, right = load_sequences(args.file_path_left), load_sequences(args.file_path_right)
    dtype = check_compatible(left, right, args.file_path_left, args.file_path_right)
    combined = combine(left, right, args.seed, dtype)
    if out.exists():
        logger.info("Replacing %s", out)
    save_sequences(combined, out)
    logger.info(
        "%d + %d sequences -> %d sequences, %d tokens (%s) -> %s",
        len(left),
        len(right),
        len(combined),
        combined.n_tokens,
        dtype,
        out,
    )
    return out


if __name__ == "__main__":
    run_cli(main)
