"""`gpu_check.py`'s workspace: random models, a student, a mapping and a corpus written to a folder,
the sizes of each mode, and the training flags of one check."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 30522
SPECIAL = dict(pad_token=0, unk_token=100, cls_token=101, sep_token=102, mask_token=103)
REAL_DATA = REPO.parent / "shared" / "data" / "binarized_text.train.bert-base-uncased.pickle"
REAL_COUNTS = REPO.parent / "shared" / "data" / "binarized_text.train.token_counts.bert-base-uncased.pickle"
# The README's recipe with DIITO on: ce + mlm + cos + causal_ce.
RECIPE = [
    "--mlm",
    "--alpha_ce",
    "0.25",
    "--alpha_mlm",
    "0.25",
    "--alpha_cos",
    "0.25",
    "--alpha_clm",
    "0",
    "--alpha_causal_ce",
    "0.25",
    "--alpha_causal_cos",
    "0",
    "--interchange_prop",
    "0.3",
    "--interchange_consecutive_only",
]


@dataclass(frozen=True)
class Sizes:
    """Model and run sizes of one mode (device, --quick)."""

    teacher_layers: int
    teacher_hidden: int
    teacher_heads: int
    student_layers: int
    batch_size: int
    seq_len: int
    train_steps: int
    bench_shapes: tuple[tuple[int, int], ...]  # (batch, seq_len) per bench_step run
    bench_reps: int
    timeout_s: int  # per check


def sizes_for(device: str, quick: bool) -> Sizes:
    if device == "cpu":  # tiny: the CPU mode only shows the script works apart from CUDA
        return Sizes(4, 32, 4, 2, 4, 32, 2 if quick else 4, ((2, 16),), 1, 300)
    if quick:
        return Sizes(12, 768, 12, 6, 32, 128, 20, ((32, 128),), 5, 240)
    return Sizes(12, 768, 12, 6, 32, 128, 60, ((32, 128), (16, 512)), 10, 300)


# --- the workspace: tokenizer, teacher, student, mapping, corpus ----------------------------------


@dataclass
class Workspace:
    teacher: Path
    student_config: Path
    student_weights: Path
    mapping: Path
    corpus: Path
    counts: Path
    data: str  # what the corpus is, for the report


def vocabulary() -> dict[str, int]:
    """30522 entries with bert-base-uncased's special-token ids (0, 100-103), so its binarized ids fit."""
    words = {f"w{i}": i for i in range(VOCAB)}
    for name, i in SPECIAL.items():
        del words[f"w{i}"]
        words[
            {
                "pad_token": "[PAD]",
                "unk_token": "[UNK]",
                "cls_token": "[CLS]",
                "sep_token": "[SEP]",
                "mask_token": "[MASK]",
            }[name]
        ] = i
    return words


def build_workspace(folder: Path, sizes: Sizes, data: str = "auto") -> Workspace:
    """Write a random teacher (with tokenizer), a student config + initial weights, a mapping and a corpus."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer, DistilBertConfig, DistilBertForMaskedLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    h, heads = sizes.teacher_hidden, sizes.teacher_heads
    teacher_dir = folder / "teacher"
    BertForMaskedLM(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=h,
            num_hidden_layers=sizes.teacher_layers,
            num_attention_heads=heads,
            intermediate_size=4 * h,
            max_position_embeddings=512,
        )
    ).save_pretrained(teacher_dir)
    BertTokenizer(vocab=vocabulary()).save_pretrained(teacher_dir)
    student_config = dict(
        vocab_size=VOCAB,
        dim=h,
        n_layers=sizes.student_layers,
        n_heads=heads,
        hidden_dim=4 * h,
        max_position_embeddings=512,
        sinusoidal_pos_embds=False,
        model_type="distilbert",
    )
    (folder / "student.json").write_text(json.dumps(student_config))
    student = DistilBertForMaskedLM(DistilBertConfig(**student_config))
    torch.save(student.state_dict(), folder / "student.pth")
    d = h // heads
    (folder / "map.nm").write_text(
        json.dumps(
            {
                "interchange_variable_mappings": [
                    {
                        "teacher_variable_names": [f"$L:{sizes.teacher_layers // 2}$H:[0:{heads}]$[0:{d}]"],
                        "student_variable_names": [f"$L:{sizes.student_layers // 2}$H:[0:{heads}]$[0:{d}]"],
                    }
                ]
            }
        )
    )

    if data == "auto":
        data = str(REAL_DATA) if REAL_DATA.is_file() else "synthetic"
    if data == "synthetic":
        rng = np.random.default_rng(0)
        n = sizes.batch_size * (sizes.train_steps + 2)
        corpus = [
            np.concatenate(
                [[SPECIAL["cls_token"]], rng.integers(1000, VOCAB, sizes.seq_len - 2), [SPECIAL["sep_token"]]]
            ).astype(np.uint16)
            for _ in range(n)
        ]
        what = f"synthetic, {n} rows of {sizes.seq_len} tokens"
    else:
        with open(data, "rb") as f:  # the project's own binarized sample (a list of uint16 arrays)
            corpus = [np.asarray(s, dtype=np.uint16) for s in pickle.load(f)]
        what = f"{Path(data).name}, {len(corpus)} sequences"
    with open(folder / "corpus.pickle", "wb") as f:
        pickle.dump(corpus, f)
    counts = np.bincount(np.concatenate(corpus), minlength=VOCAB).tolist()
    (folder / "counts.pickle").write_bytes(pickle.dumps(counts))
    return Workspace(
        teacher_dir,
        folder / "student.json",
        folder / "student.pth",
        folder / "map.nm",
        folder / "corpus.pickle",
        folder / "counts.pickle",
        what,
    )


def train_argv(ws: Workspace, sizes: Sizes, device: str, run_name: str, *extra: str) -> list[str]:
    """`causal_train.py` flags of one check: the DIITO recipe, one micro-batch per optimizer step."""
    return [
        "--force",
        "--n_gpu",
        "1" if device == "cuda" else "0",
        "--dump_path",
        str(ws.corpus.parent / "runs"),
        "--run_name",
        run_name,
        "--data_file",
        str(ws.corpus),
        "--token_counts",
        str(ws.counts),
        "--student_type",
        "distilbert",
        "--student_config",
        str(ws.student_config),
        "--student_pretrained_weights",
        str(ws.student_weights),
        "--teacher_type",
        "bert",
        "--teacher_name",
        str(ws.teacher),
        "--neuron_mapping",
        str(ws.mapping),
        "--batch_size",
        str(sizes.batch_size),
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        str(sizes.train_steps),
        "--log_interval",
        "1",
        "--checkpoint_interval",
        "1000000",
        "--seed",
        "0",
        *RECIPE,
        *extra,
    ]


# --- the plan ------------------------------------------------------------------------------------
