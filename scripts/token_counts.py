"""Count how often each vocabulary id occurs in a binarized corpus (smooths MLM target sampling).

    python scripts/token_counts.py --data_file data/binarized_text.train.bert-base-uncased.pickle \
        --token_counts_dump data/binarized_text.train.token_counts.bert-base-uncased.pickle --vocab_size 30522

Writes, atomically, a pickled Python list of `vocab_size` ints (the original format). Ids outside
[0, vocab_size) are refused: they would index past the embedding table in training.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...`: find the repo's modules

import numpy as np  # noqa: E402

from token_store import check_vocab_range, check_writable, load_sequences, output_file  # noqa: E402
from utils import UserError, run_cli  # noqa: E402

logger = logging.getLogger("token_counts")

BLOCK = 1 << 24  # tokens counted at once: bincount widens to int64, so this bounds the temporary copy


def count_tokens(flat: np.ndarray, vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64 occurrences of each id in `flat` (ids already checked to be in [0, vocab_size)).

    Any integer dtype: bincount refuses uint64, so each block goes through intp (the ids fit).
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(flat), BLOCK):
        counts += np.bincount(flat[start : start + BLOCK].astype(np.intp, copy=False), minlength=vocab_size)
    return counts


def main(argv: list[str] | None = None) -> list[int]:
    p = argparse.ArgumentParser(description="Token counts of a binarized corpus.")
    p.add_argument(
        "--data_file",
        type=str,
        default="data/dump.bert-base-uncased.pickle",
        help="Binarized corpus: *.pickle or *.tokens.npy.",
    )
    p.add_argument(
        "--token_counts_dump",
        type=str,
        default="data/token_counts.bert-base-uncased.pickle",
        help="Output pickle (a list of vocab_size ints).",
    )
    p.add_argument("--vocab_size", default=30522, type=int, help="Size of the tokenizer's vocabulary.")
    args = p.parse_args(argv)
    if args.vocab_size < 1:
        raise UserError(f"--vocab_size must be positive, got {args.vocab_size}")
    if args.vocab_size > 1 << 31:
        raise UserError(f"--vocab_size {args.vocab_size} is larger than any token id can be (2**31)")
    dump = Path(args.token_counts_dump)
    if dump.exists() and dump.resolve() == Path(args.data_file).resolve():
        raise UserError(f"--token_counts_dump {args.token_counts_dump} is the data file itself")
    check_writable(dump, "--token_counts_dump")
    store = load_sequences(args.data_file)
    if store.n_tokens == 0:
        raise UserError(f"{args.data_file} holds no tokens")
    check_vocab_range(store, args.vocab_size, args.data_file)
    try:
        counts = count_tokens(store.flat, args.vocab_size)
    except MemoryError:
        raise UserError(f"not enough memory to count {args.vocab_size} ids (--vocab_size)") from None
    with output_file(args.token_counts_dump) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(counts.tolist(), f, protocol=4)  # a list of Python ints, as the original wrote
    logger.info(
        "Counted %d tokens of %d sequences (%d distinct ids of %d) -> %s",
        store.n_tokens,
        len(store),
        np.count_nonzero(counts),
        args.vocab_size,
        args.token_counts_dump,
    )
    return counts.tolist()


if __name__ == "__main__":
    run_cli(main)
