"""Concatenate two binarized corpora, shuffle, and write one (e.g. WikiText + BookCorpus).

    python scripts/data_combinator.py \
        --file_path_left bookcorpus-dataset/binarized_text.train.bert-base-uncased.pickle \
        --file_path_right wikitext-dataset/binarized_text.train.bert-base-uncased.pickle \
        --split train --tokenizer_name bert-base-uncased --dump_file wikitext+bookcorpus-dataset/binarized_text
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from scripts.binarized_data import output_path  # noqa: E402
from token_store import TokenSequences, load_sequences, save_sequences  # noqa: E402
from utils import run_cli  # noqa: E402

logger = logging.getLogger("data_combinator")


def combine(left: TokenSequences, right: TokenSequences, seed: int) -> TokenSequences:
    """Both corpora in one shuffled corpus; ids keep the wider of the two dtypes."""
    dtype = np.result_type(left.flat.dtype, right.flat.dtype)
    both = TokenSequences(
        np.concatenate([left.flat.astype(dtype, copy=False), right.flat.astype(dtype, copy=False)]),
        np.concatenate([left.offsets, right.offsets[1:] + left.offsets[-1]]),
    )
    return both.permuted(np.random.default_rng(seed).permutation(len(both)))


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="Combine two binarized corpora.")
    p.add_argument("--file_path_left", type=str, required=True, help="First binarized corpus (.pickle / .tokens.npy).")
    p.add_argument("--file_path_right", type=str, required=True, help="Second binarized corpus.")
    p.add_argument("--split", type=str, default="train", help="Split name used in the output name.")
    p.add_argument("--tokenizer_name", type=str, default="bert-base-uncased", help="Used in the output name.")
    p.add_argument("--dump_file", type=str, default="data/dump", help="Output prefix.")
    p.add_argument("--seed", type=int, default=56, help="Seed of the shuffle.")
    p.add_argument("--format", choices=["pickle", "memmap"], default="pickle", help="Output format.")
    args = p.parse_args(argv)
    left, right = load_sequences(args.file_path_left), load_sequences(args.file_path_right)
    combined = combine(left, right, args.seed)
    out = output_path(args.dump_file, args.split, args.tokenizer_name, args.format)
    save_sequences(combined, out)
    logger.info("%d + %d sequences (%d tokens, %s) -> %s", len(left), len(right), combined.n_tokens,
                combined.flat.dtype, out)
    return out


if __name__ == "__main__":
    run_cli(main)
