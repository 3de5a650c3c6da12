"""LmSeqsDataset filtering, dual pairing and collation; the grouped batch sampler; token stores."""

from __future__ import annotations

import bisect
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import BERT_COUNTS, BERT_PICKLE, BERT_SPECIAL_IDS
from torch.utils.data import DistributedSampler

import token_store
from grouped_batch_sampler import GroupedBatchSampler, create_lengths_groups
from lm_seqs_dataset import DatasetParams, LmSeqsDataset, pad_token_id
from utils import UserError

CLS, SEP, UNK, PAD = 101, 102, 100, 0


def original_filter(seqs: list[np.ndarray], max_len: int) -> list[np.ndarray]:
    """The original's filtering, written as its loops: split long, drop short, drop unknown."""
    out = []
    for seq in seqs:
        if len(seq) <= max_len:
            out.append(seq)
            continue
        for i in range(0, len(seq), max_len - 2):
            sub = seq[i : i + max_len - 2]
            if sub[0] != CLS:
                sub = np.insert(sub, 0, CLS)
            if sub[-1] != SEP:
                sub = np.insert(sub, len(sub), SEP)
            out.append(sub)
    out = [s for s in out if len(s) > 11]
    return [s for s in out if np.count_nonzero(s == UNK) / len(s) < 0.5]


def bert_params(max_len: int = 512, seed: int = 0) -> DatasetParams:
    return DatasetParams(max_model_input_size=max_len, mlm=True, special_token_ids=dict(BERT_SPECIAL_IDS), seed=seed)


def test_real_corpus_filters_as_the_original(shared_data):
    store = token_store.load_sequences(BERT_PICKLE)
    assert (len(store), store.n_tokens) == (1000, 61864)
    ds = LmSeqsDataset(bert_params(512), store)
    assert len(ds) == 458
    expected = original_filter(list(store), 512)
    assert all(np.array_equal(ds.sequence(i), s) for i, s in enumerate(expected))


@pytest.mark.parametrize("max_len", [16, 64, 100])
def test_long_sequences_are_chunked_like_the_original(shared_data, max_len):
    store = token_store.load_sequences(BERT_PICKLE)
    ds = LmSeqsDataset(bert_params(max_len), store)
    expected = original_filter(list(store), max_len)
    assert len(ds) == len(expected)
    for i, s in enumerate(expected):
        got = ds.sequence(i)
        assert np.array_equal(got, s)
        assert got[0] == CLS and got[-1] == SEP and len(got) <= max_len


def test_mostly_unknown_sequences_are_dropped():
    body = lambda n_unk, n_ok: [UNK] * n_unk + [7] * n_ok  # noqa: E731
    seqs = [np.array([CLS, *body(7, 5), SEP]), np.array([CLS, *body(6, 6), SEP])]  # 7/14 = 50% vs 6/14
    ds = LmSeqsDataset(bert_params(), [s.astype(np.uint16) for s in seqs])
    assert len(ds) == 1 and np.array_equal(ds.sequence(0), seqs[1])


def test_dual_pairing_is_a_seeded_permutation(shared_data):
    store = token_store.load_sequences(BERT_PICKLE)
    a, b = LmSeqsDataset(bert_params(seed=3), store), LmSeqsDataset(bert_params(seed=3), store)
    assert np.array_equal(a.dual_index, b.dual_index)
    assert sorted(a.dual_index) == list(range(len(a)))
    ids, n, dual, dual_n = a[5]
    assert np.array_equal(dual, a.sequence(a.dual_index[5])) and dual_n == len(dual) and n == len(ids)
    assert not np.array_equal(a.dual_index, LmSeqsDataset(bert_params(seed=4), store).dual_index)


def test_collation_pads_base_and_cuts_dual_to_base_length():
    seqs = [np.array([CLS, *range(1000, 1000 + k), SEP], dtype=np.uint16) for k in (10, 30, 14)]
    ds = LmSeqsDataset(bert_params(), seqs)
    items = [(ds.sequence(0), 12, ds.sequence(1), 32), (ds.sequence(2), 16, ds.sequence(0), 12)]
    ids, lengths, dual, dual_lengths = ds.batch_sequences(items)
    assert ids.shape == dual.shape == (2, 16) and ids.dtype == torch.int64
    assert lengths.tolist() == [12, 16] and dual_lengths.tolist() == [16, 12]
    assert ids[0, :12].tolist() == ds.sequence(0).tolist() and (ids[0, 12:] == PAD).all()
    assert dual[0].tolist() == ds.sequence(1)[:16].tolist()  # cut to the base's longest length
    assert dual[1, :12].tolist() == ds.sequence(0).tolist() and (dual[1, 12:] == PAD).all()


@pytest.mark.parametrize(
    "special, mlm, pad",
    [
        (BERT_SPECIAL_IDS, True, 0),  # MLM: the pad token
        (dict(bos_token=7, eos_token=7, unk_token=7), False, 7),  # GPT-2: <|endoftext|>, its unknown token
        (dict(unk_token=0, bos_token=1, eos_token=2, pad_token=2), False, 0),  # SmolLM2-like: unknown first
        (dict(eos_token=5, pad_token=5), False, 5),  # Qwen-like: no unknown token, the pad
        (dict(bos_token=1, eos_token=2), False, 2),  # Llama-3-like: neither, the end token
    ],
)
def test_one_pad_rule_serves_collation_and_fp16_widening(special, mlm, pad):
    assert pad_token_id(special, mlm) == pad
    assert DatasetParams(64, mlm, special).pad_id == pad


def test_a_causal_tokenizer_with_nothing_to_pad_with_is_refused():
    with pytest.raises(UserError, match="none of unk_token, pad_token, eos_token"):
        pad_token_id(dict(bos_token=1), False)


def test_length_ordered_batches_cover_every_sequence_once_shortest_first():
    lengths = [19, 13, 17, 13, 22, 15, 17]  # ties kept in corpus order (a stable sort)
    seqs = [
        np.array([CLS, *range(1000 + 20 * i, 1000 + 20 * i + k), SEP], dtype=np.uint16) for i, k in enumerate(lengths)
    ]
    ds = LmSeqsDataset(bert_params(), seqs)
    batches = list(ds.length_ordered_batches(3))
    assert [b[0].size(0) for b in batches] == [3, 3, 1]
    order = [1, 3, 5, 2, 6, 0, 4]
    for n, (ids, lens, dual, dual_lens) in enumerate(batches):
        expected = ds.batch_sequences([ds[i] for i in order[3 * n : 3 * n + 3]])
        for got, want in zip((ids, lens, dual, dual_lens), expected, strict=False):
            assert torch.equal(got, want)
    assert torch.cat([b[1] for b in batches]).tolist() == sorted(k + 2 for k in lengths)


def test_badly_framed_or_empty_corpus_is_refused():
    with pytest.raises(UserError, match="does not start with id 101"):
        LmSeqsDataset(bert_params(), [np.arange(5, 20, dtype=np.uint16)])
    with pytest.raises(UserError, match="no sequence left"):
        LmSeqsDataset(bert_params(), [np.array([CLS, 5, SEP], dtype=np.uint16)])
    with pytest.raises(UserError, match="empty"):
        LmSeqsDataset(bert_params(), [])


def test_memmap_and_pickle_stores_yield_the_same_sequences(shared_data, tmp_path):
    store = token_store.load_sequences(BERT_PICKLE)
    token_store.save_memmap(store, tmp_path / "c.tokens.npy")
    token_store.save_pickle(store, tmp_path / "c.pickle")
    mm = token_store.load_sequences(tmp_path / "c.tokens.npy")
    pk = token_store.load_sequences(tmp_path / "c.pickle")
    assert isinstance(mm.flat, np.memmap) and mm.flat.dtype == np.uint16
    assert all(np.array_equal(x, y) for x, y in zip(mm, store, strict=False)) and len(mm) == len(pk) == len(store)
    # The re-written pickle is the original format: a plain list of uint16 arrays.
    with open(tmp_path / "c.pickle", "rb") as f:
        raw = pickle.load(f)
    assert isinstance(raw, list) and raw[0].dtype == np.uint16
    a, b = LmSeqsDataset(bert_params(), mm), LmSeqsDataset(bert_params(), pk)
    assert np.array_equal(a.lengths, b.lengths) and all(
        np.array_equal(a.sequence(i), b.sequence(i)) for i in range(len(a))
    )


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps([np.arange(3), _Evil()]))
    with pytest.raises(UserError, match="forbidden global"):
        token_store.load_sequences(path)
    assert not (tmp_path / "pwned_marker").exists()


def test_non_integer_or_truncated_pickles_are_refused(tmp_path):
    (tmp_path / "floats.pickle").write_bytes(pickle.dumps([np.ones(3)]))
    with pytest.raises(UserError, match="not a 1-D integer"):
        token_store.load_sequences(tmp_path / "floats.pickle")
    (tmp_path / "empty.pickle").write_bytes(b"")
    with pytest.raises(UserError, match="empty, truncated or corrupt"):
        token_store.load_sequences(tmp_path / "empty.pickle")
    good = pickle.dumps([np.arange(100, dtype=np.uint16)] * 10)
    (tmp_path / "cut.pickle").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="empty, truncated or corrupt"):
        token_store.load_sequences(tmp_path / "cut.pickle")
    with pytest.raises(UserError, match="not found"):
        token_store.load_sequences(tmp_path / "missing.pickle")


def test_memmap_store_with_mismatched_offsets_is_refused(tmp_path):
    token_store.save_memmap([np.arange(5, dtype=np.uint16)] * 3, tmp_path / "a.tokens.npy")
    np.save(tmp_path / "a.offsets.npy", np.array([0, 5, 10, 99]))
    with pytest.raises(UserError, match="do not match"):
        token_store.load_sequences(tmp_path / "a.tokens.npy")
    with pytest.raises(UserError, match="offsets file"):
        token_store.load_sequences(tmp_path / "a.offsets.npy")


def test_token_counts_file_is_a_safe_list_of_counts(shared_data):
    counts = token_store.safe_load_pickle(BERT_COUNTS)
    store = token_store.load_sequences(BERT_PICKLE)
    assert len(counts) == 30522 and counts == np.bincount(store.flat, minlength=30522).tolist()


def test_grouped_batches_share_a_length_bin_and_cover_the_sampler():
    rng = np.random.default_rng(0)
    lengths = rng.integers(12, 40, size=203)  # 7 bins of width 4
    groups = create_lengths_groups(lengths)
    sampler = GroupedBatchSampler(list(rng.permutation(203)), groups, batch_size=8)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 26
    assert sorted(i for b in batches for i in b) == list(range(203))
    full_single_bin = [b for b in batches if len({groups[i] for i in b}) == 1 and len(b) == 8]
    assert len(full_single_bin) >= 15  # most batches come from one bin of width 4
    for b in full_single_bin:
        assert np.ptp(lengths[b]) < 4


def test_length_bins_have_the_original_edges_3_7_11():
    # The original quantised lengths with bisect_right over the edges 3, 7, 11, ... (HF's
    # create_lengths_groups): 0-2 | 3-6 | 7-10 | 11-14 ...
    lengths = np.arange(0, 40)
    edges = list(range(3, 512, 4))
    expected = [bisect.bisect_right(edges, int(n)) for n in lengths]
    assert create_lengths_groups(lengths).tolist() == expected
    assert create_lengths_groups([3, 6, 7, 10, 11]).tolist() == [1, 1, 2, 2, 3]


def test_grouping_under_a_distributed_sampler_gives_disjoint_epoch_shards():
    lengths = np.random.default_rng(1).integers(12, 100, size=101)
    groups = create_lengths_groups(lengths)
    ds = list(range(101))
    shards = []
    for rank in range(2):
        sampler = GroupedBatchSampler(DistributedSampler(ds, num_replicas=2, rank=rank, seed=5), groups, 4)
        sampler.set_epoch(0)
        epoch0 = [i for b in sampler for i in b]
        sampler.set_epoch(1)
        epoch1 = [i for b in sampler for i in b]
        assert epoch0 != epoch1  # reshuffled each epoch
        shards.append(set(epoch0))
    # DistributedSampler pads 101 to 102 by repeating one index; otherwise the shards are disjoint.
    assert len(shards[0] & shards[1]) <= 1 and shards[0] | shards[1] == set(ds)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles_of_every_protocol_load(tmp_path, protocol):
    seqs = [np.array([CLS, 5, 6, SEP], dtype=np.uint16), np.array([CLS, 7, SEP], dtype=np.int32)]
    (tmp_path / "p.pickle").write_bytes(pickle.dumps(seqs, protocol=protocol))
    store = token_store.load_sequences(tmp_path / "p.pickle")
    assert [s.tolist() for s in store] == [s.tolist() for s in seqs]


def test_permuted_store_reorders_whole_sequences():
    seqs = [np.arange(k, dtype=np.uint16) + 10 * k for k in (3, 1, 4, 2)]
    store = token_store.TokenSequences.from_list(seqs)
    order = np.array([2, 0, 3, 1])
    out = store.permuted(order, block=3)  # a block boundary inside the corpus
    assert [s.tolist() for s in out] == [seqs[i].tolist() for i in order] and out.flat.dtype == np.uint16
