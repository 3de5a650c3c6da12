"""Count how often each vocabulary id occurs in a binarized corpus (smooths MLM target sampling).

    python scripts/token_counts.py --data_file data/binarized_text.train.bert-base-uncased.pickle \
        --token_counts_dump data/binarized_text.train.token_counts.bert-base-uncased.pickle --vocab_size 30522
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from token_store import check_vocab_range, load_sequences  # noqa: E402
from utils import UserError, atomic_path, run_cli  # noqa: E402

logger = logging.getLogger("token_counts")


def count_tokens(flat: np.ndarray, vocab_size: int) -> list[int]:
    """(vocab_size,) occurrences of each id, as a Python list of ints (the original's format)."""
    return np.bincount(np.asarray(flat, dtype=np.int64), minlength=vocab_size).tolist()


def main(argv: list[str] | None = None) -> list[int]:
    p = argparse.ArgumentParser(description="Token counts of a binarized corpus.")
    p.add_argument("--data_file", type=str, default="data/dump.bert-base-uncased.pickle",
                   help="Binarized corpus: *.pickle or *.tokens.npy.")
    p.add_argument("--token_counts_dump", type=str, default="data/token_counts.bert-base-uncased.pickle",
                   help="Output pickle (a list of vocab_size ints).")
    p.add_argument("--vocab_size", default=30522, type=int)
    args = p.parse_args(argv)
    if args.vocab_size < 1:
        raise UserError(f"--vocab_size must be positive, got {args.vocab_size}")
    store = load_sequences(args.data_file)
    check_vocab_range(store, args.vocab_size, args.data_file)
    counts = count_tokens(store.flat, args.vocab_size)
    with atomic_path(args.token_counts_dump) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(counts, f, protocol=4)
    logger.info("Counted %d tokens of %d sequences -> %s", store.n_tokens, len(store), args.token_counts_dump)
    return counts


if __name__ == "__main__":
    run_cli(main)
