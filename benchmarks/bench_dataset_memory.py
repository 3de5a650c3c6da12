"""Memory of one training process holding the corpus: the pickle vs the memory-mapped store.

    python benchmarks/bench_dataset_memory.py --sizes 1e6 1e7 1e8

For each size, a synthetic corpus (random bert-base-uncased ids, sequence lengths 12-256, so
about 134 tokens on average; CLS/SEP framing) is written in both formats to a temporary folder
(removed afterwards). A fresh subprocess then loads it with `token_store.load_sequences`, builds
the training dataset `LmSeqsDataset` from it, and makes one batch; it reports how much it grew:

* RSS: resident memory, including file-backed pages of the memory map (page cache: shared by every
  process that maps the file, and evictable);
* anonymous: RSS minus file-backed pages -- the private memory each of N ranks pays on its own;
* USS: pages no other process maps (psutil `uss`); a single process's touched map pages count here,
  N ranks share them;
* peak: the highest RSS during the load (Linux VmHWM, reset before it), above the RSS before it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time
import psutil
sys.path.insert(0, {repo!r})
from lm_seqs_dataset import DatasetParams, LmSeqsDataset
from token_store import load_sequences

proc = psutil.Process()
def snapshot():
    m = proc.memory_full_info()
    return m.rss, m.rss - m.shared, m.uss
def high_water():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS, so imports before this point do not count
before = snapshot()
start = time.perf_counter()
params = DatasetParams(512, True, dict(pad_token=0, unk_token=100, cls_token=101, sep_token=102, mask_token=103))
dataset = LmSeqsDataset(params, load_sequences({path!r}))
dataset.batch_sequences([dataset[i] for i in range(0, len(dataset), max(len(dataset) // 32, 1))][:32])
seconds = time.perf_counter() - start
after = snapshot()
peak = high_water()
mib = lambda b: b / 2**20
print(json.dumps(dict(n=len(dataset), seconds=seconds, rss=mib(after[0] - before[0]), anon=mib(after[1] - before[1]),
                      uss=mib(after[2] - before[2]), peak=mib(peak - before[0]))))
"""


def synthetic_corpus(n_tokens: int, seed: int = 0):
    from token_store import TokenSequences

    rng = np.random.default_rng(seed)
    lengths = rng.integers(12, 257, size=n_tokens // 12 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_tokens) + 1]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = rng.integers(1000, 30522, size=int(offsets[-1]), dtype=np.uint16)
    flat[offsets[:-1]] = 101
    flat[offsets[1:] - 1] = 102
    return TokenSequences(flat, offsets)


def measure(path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=str(REPO), path=str(path))], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from token_store import save_memmap, save_pickle

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="Corpus sizes in tokens.")
    args = p.parse_args()
    started = time.perf_counter()
    print("MiB grown by one process loading the corpus and building LmSeqsDataset (fresh subprocess per row)")
    print("| tokens | sequences kept | format | file MiB | RSS | anonymous | USS | peak RSS | load s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            corpus = synthetic_corpus(int(size))
            files = {"pickle": Path(tmp) / "c.pickle", "memmap": Path(tmp) / "c.tokens.npy"}
            save_pickle(corpus, files["pickle"])
            save_memmap(corpus, files["memmap"])
            del corpus
            for fmt, path in files.items():
                r = measure(path)
                size_mib = (
                    sum(
                        f.stat().st_size
                        for f in Path(tmp).glob("c.*")
                        if (fmt == "pickle") == f.name.endswith(".pickle")
                    )
                    / 2**20
                )
                print(
                    f"| {size:.0e} | {r['n']:,} | {fmt} | {size_mib:.0f} | {r['rss']:.0f} | {r['anon']:.0f} | "
                    f"{r['uss']:.0f} | {r['peak']:.0f} | {r['seconds']:.1f} |",
                    flush=True,
                )
            for f in Path(tmp).iterdir():
                f.unlink()
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
