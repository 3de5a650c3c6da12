"""Resident memory per training process: the pickle corpus vs the memory-mapped store.

    python benchmarks/bench_dataset_memory.py --sizes 1e6 1e7 1e8

For each corpus size a synthetic corpus (random bert-base-uncased ids, sequence lengths 12-256)
is written in both formats to a temporary folder; a fresh subprocess then builds the training
dataset (`LmSeqsDataset`) from each and reports how much its memory grew: RSS, and private memory
(RSS minus file-backed pages): what each of N ranks pays on its own. The memory-mapped store's
file-backed pages live in the page cache, shared by all ranks and evictable.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, psutil
sys.path.insert(0, {repo!r})
from lm_seqs_dataset import DatasetParams, LmSeqsDataset
from token_store import load_sequences
proc = psutil.Process()
before = proc.memory_info()
ds = LmSeqsDataset(DatasetParams(512, True, dict(pad_token=0, unk_token=100, cls_token=101, sep_token=102,
                                                 mask_token=103)), load_sequences({path!r}))
batch = ds.batch_sequences([ds[i] for i in range(0, len(ds), max(len(ds) // 64, 1))][:64])  # touch some data
after = proc.memory_info()
private = lambda m: m.rss - m.shared  # anonymous memory: not backed by the (shareable) page cache
print(json.dumps(dict(n=len(ds), rss=(after.rss - before.rss) / 2**20, private=(private(after) - private(before)) / 2**20)))
"""


def synthetic_corpus(n_tokens: int, seed: int = 0):
    from token_store import TokenSequences

    rng = np.random.default_rng(seed)
    lengths = rng.integers(12, 257, size=int(n_tokens / 134) + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_tokens) + 1]
    flat = rng.integers(1000, 30522, size=int(lengths.sum()), dtype=np.uint16)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat[offsets[:-1]] = 101
    flat[offsets[1:] - 1] = 102
    return TokenSequences(flat, offsets.astype(np.int64))


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), path=str(path))],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from token_store import save_memmap, save_pickle

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="Corpus sizes in tokens.")
    args = p.parse_args()
    print("| tokens | sequences | pickle RSS (MiB) | pickle private (MiB) | memmap RSS (MiB) | memmap private (MiB) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            corpus = synthetic_corpus(int(size))
            pk, mm = Path(tmp) / "c.pickle", Path(tmp) / "c.tokens.npy"
            save_pickle(corpus, pk)
            save_memmap(corpus, mm)
            del corpus
            a, b = measure(pk), measure(mm)
            print(f"| {size:.0e} | {a['n']:,} | {a['rss']:.0f} | {a['private']:.0f} | {b['rss']:.0f} | {b['private']:.0f} |",
                  flush=True)
            for f in Path(tmp).iterdir():
                f.unlink()


if __name__ == "__main__":
    main()
