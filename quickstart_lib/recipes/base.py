"""What every teacher recipe provides, and the behaviour the recipes share.

A recipe is everything specific to one teacher: how it becomes a teacher, the tokenizer the corpus is
binarized with, the student extracted from it, the training flags of each variant, and how trained
students are scored on the held-out text. The pipeline, the seeds and the statistics only call this
interface; another teacher is another subclass and a row in `quickstart_lib.recipes.RECIPES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
from torch import nn
from transformers import AutoTokenizer

import mlm_eval
from architectures import num_layers
from masking import load_token_counts
from model_files import check_model_folder, check_tokenizer_fits
from neuron_mapping import deserialize_variable_name, load_neuron_mapping
from quickstart_lib.settings import Settings
from quickstart_lib.statistics import Metric
from scripts import binarized_data
from utils import UserError, first_line, require_no_symlink_loop, write_json


def check_teacher_dir(folder: str | Path) -> None:
    """Refuse a teacher folder whose files are broken, naming the file: no or a broken config.json
    (not JSON, wrongly typed fields), weights cut short, no tokenizer or another model's (`model_files`)."""
    require_no_symlink_loop(folder, "--teacher_dir")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(
            f"--teacher_dir {folder} is not a model folder (no config.json): convert one with "
            "python scripts/convert_gguf.py --gguf_file smollm2 --output_dir DIR"
        )
    config = check_model_folder(folder, "a teacher folder brings its tokenizer (scripts/convert_gguf.py writes it)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # many types for one cause: the tokenizer files cannot be read
        raise UserError(f"cannot load the tokenizer in {folder}: {first_line(e)}") from None
    check_tokenizer_fits(tokenizer, config, folder)


class Recipe(ABC):
    """One teacher's stages 3-6 over the output folder `out` (see the module docstring).

    A subclass sets the class attributes below and, in `__init__`, the paths: `source` (the pretrained
    model the teacher is made from, whose tokenizer binarizes the corpus), `teacher`, `student_weights`,
    `student_config`, and the outputs that mark its stages done (`source_outputs` when the recipe makes its
    source, `teacher_outputs`, `student_outputs`).

    Mappings: `mappings` names the neuron mappings a recipe can train DIITO with, the first being the
    default (the DIITO of the paired comparison); `mapped_blocks(name)` lists the (teacher block, student
    block) pairs of each, one mapping entry per pair, and `mapping_file(name)` is where it is written.
    Held-out interchange accuracy always intervenes at the default mapping's first entry.
    """

    name: ClassVar[str]  # the teacher, as the report names it
    tokenizer_type: ClassVar[str]  # scripts/binarized_data.py --tokenizer_type
    student_type: ClassVar[str]  # causal_train.py --student_type
    teacher_type: ClassVar[str]  # causal_train.py --teacher_type
    defaults: ClassVar[dict] = {}  # replace Settings' defaults
    tiny: ClassVar[dict] = {}  # added to TINY with --tiny
    takes_teacher_dir: ClassVar[bool]  # whether --teacher_dir may name a teacher made already
    log_points: ClassVar[int]  # TensorBoard logs per run
    unigram_label: ClassVar[str]  # the report's row of the context-free baseline ({top}: its top-1)
    accuracy_metric: ClassVar[str]  # the metric of the teacher check
    metrics: ClassVar[tuple[Metric, ...]]
    lm_loss: ClassVar[str]  # the student's own loss, "MLM" or "CLM"
    control: ClassVar[str | None] = None  # the variant trained with lm_loss alone (first seed), if any
    alphas: ClassVar[list[str]]  # causal_train.py loss weights of every variant
    variants: ClassVar[dict[str, list[str]]]  # flags added per variant (later flags win), the control's too
    variant_flags: ClassVar[list[str]] = []  # flags after the variant's, before the interchange ones
    recipe_text: ClassVar[str]  # the summary's words on the training recipe
    plot_title: ClassVar[str]
    eval_label: ClassVar[str]  # the progress bars' name of the held-out evaluation
    heldout_class: ClassVar[type]  # mlm_eval.HeldoutMlm or clm_eval.HeldoutClm
    make_dataset: ClassVar  # mclm_eval.make_dataset or clm_eval.make_dataset, as a staticmethod

    mappings: ClassVar[dict[str, str]]  # name -> what it maps, for the report; the first is the default

    source: Path
    teacher: Path
    student_weights: Path
    student_config: Path
    source_outputs: list[Path]  # empty (the default): the source exists already, e.g. an installed package
    teacher_outputs: list[Path]
    student_outputs: list[Path]

    def __init__(self, out: Path, s: Settings, teacher_dir: str | None = None):
        self.out, self.s, self.teacher_dir = out, s, teacher_dir  # teacher_dir: only if takes_teacher_dir
        self.student = out / "student"
        self.source_outputs = []
        self.counts = out / "data" / "binarized_text.train.token_counts.pickle"
        self._heldout = None  # the heldout_class instance, made on first use
        self._variable_names: tuple[str, str] = ("", "")  # serialized (teacher, student), set with _heldout

    @property
    def data(self) -> dict[str, Path]:
        """The binarized splits, named after the tokenizer's folder as scripts/binarized_data.py names them
        (known once that folder exists: a converted teacher is made before the data)."""
        return {
            split: binarized_data.output_path(
                str(self.out / "data" / "binarized_text"), split, str(self.source), "pickle"
            )
            for split in ("train", "heldout")
        }

    # --- stages 3-5 ---------------------------------------------------------------------------

    @abstractmethod
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (for the token counts, before the teacher stage if need be)."""

    @abstractmethod
    def teacher_config(self):
        """The teacher's Hugging Face config."""

    def make_source(self) -> None:
        """Make `source` (before the data: its tokenizer binarizes the corpus); nothing by default."""
        return None

    @abstractmethod
    def make_teacher(self) -> None:
        """The teacher folder, made from `source` on the binarized training data."""

    @abstractmethod
    def make_student(self) -> None:
        """The student's weights, config and neuron mapping (`student_outputs`)."""

    @abstractmethod
    def mapped_blocks(self, name: str) -> list[tuple[int, int]]:
        """(teacher block, student block) pairs of mapping `name`, one mapping entry each."""

    @property
    def default_mapping(self) -> str:
        return next(iter(self.mappings))

    @property
    def mapping(self) -> Path:
        """The default mapping's file (the DIITO runs of the paired comparison, held-out interchange)."""
        return self.mapping_file(self.default_mapping)

    def mapping_file(self, name: str) -> Path:
        return self.student / f"{name}_layer_{self.s.student_layers}.nm"

    def neuron_mapping(self, teacher_config, name: str) -> dict:
        """Each mapped block's full output: every $H slice of hidden_size // num_attention_heads dims."""
        heads = teacher_config.num_attention_heads
        width = teacher_config.hidden_size // heads
        return {
            "interchange_variable_mappings": [
                {
                    "teacher_variable_names": [f"$L:{t_block}$H:[0:{heads}]$[0:{width}]"],
                    "student_variable_names": [f"$L:{s_block}$H:[0:{heads}]$[0:{width}]"],
                }
                for t_block, s_block in self.mapped_blocks(name)
            ]
        }

    def write_mappings(self, teacher_config) -> None:
        for name in self.mappings:
            write_json(self.neuron_mapping(teacher_config, name), self.mapping_file(name))

    def train_flags(self, variant: str, mapping: str | None = None) -> list[str]:
        """causal_train.py flags of `variant` that depend on the teacher: models, mapping (the default one
        unless named), losses, interchange."""
        return [
            "--student_type",
            self.student_type,
            "--student_config",
            str(self.student_config),
            "--student_pretrained_weights",
            str(self.student_weights),
            "--teacher_type",
            self.teacher_type,
            "--teacher_name",
            str(self.teacher),
            "--neuron_mapping",
            str(self.mapping_file(mapping or self.default_mapping)),
            *self.alphas,
            *self.variants[variant],
            *self.variant_flags,
            "--interchange_prop",
            str(self.s.interchange_prop),
            "--interchange_max_token",
            "-1",
            "--interchange_consecutive_only",
        ]

    # --- stage 6: evaluation ------------------------------------------------------------------

    @abstractmethod
    def load_teacher(self) -> nn.Module: ...

    @abstractmethod
    def load_extracted(self) -> nn.Module:
        """The student as extracted, before training."""

    @abstractmethod
    def load_run(self, run: Path) -> nn.Module:
        """A trained student from its run folder."""

    @abstractmethod
    def unigram_baseline(self, counts: np.ndarray, heldout, tokenizer, train) -> dict:
        """The held-out scores of the training corpus's token frequencies, with its top-1 id as "top_id"."""

    @abstractmethod
    def teacher_scores(self, heldout) -> dict:
        """The teacher's held-out LM scores."""

    @abstractmethod
    def interchange_counts(self, heldout) -> tuple[int, int]:
        """(positions compared, (base, source) pairs) of the held-out interchange accuracy."""

    @staticmethod
    @abstractmethod
    def heldout_text(results: dict) -> str:
        """The summary's sentence on what the held-out scores are computed on."""

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.teacher)

    def dataset(self, split: str):
        config = self.teacher_config()
        store = mlm_eval.load_store(self.data[split], config.vocab_size)
        return self.make_dataset(store, self.tokenizer(), config, self.s.seed)

    def heldout(self):
        """The teacher's predictions on the held-out set, computed once per call of the script."""
        if self._heldout is None:
            (t_names, s_names), *_ = load_neuron_mapping(self.mapping)  # the default mapping's first entry
            self._variable_names = (t_names[0], s_names[0])
            self._heldout = self.heldout_class(
                self.load_teacher(),
                self.dataset("heldout"),
                deserialize_variable_name(t_names[0]),
                deserialize_variable_name(s_names[0]),
                seed=self.s.seed,
                interchange_prop=self.s.interchange_prop,
            )
        return self._heldout

    @staticmethod
    def with_size(row: dict, model: nn.Module) -> dict:
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["layers"] = num_layers(model)
        return row

    def evaluate_references(self) -> dict:
        """Teacher, extracted student and the context-free baseline, on the held-out set."""
        h = self.heldout()
        extracted = self.load_extracted()
        tokenizer = self.tokenizer()
        counts = load_token_counts(self.counts, h.teacher.config.vocab_size)
        train = self.dataset("train")
        unigram = self.unigram_baseline(counts, h, tokenizer, train)
        unigram["top_token"] = tokenizer.convert_ids_to_tokens(unigram.pop("top_id"))
        teacher_vars, student_vars = self._variable_names
        positions, pairs = self.interchange_counts(h)
        return {
            "models": {
                "teacher": self.with_size(self.teacher_scores(h), h.teacher),
                "extracted": self.with_size(h.score(extracted, f"{self.eval_label}: extracted"), extracted),
            },
            "unigram_baseline": unigram,
            "interchange": {
                "teacher_variables": teacher_vars,
                "student_variables": student_vars,
                "positions": positions,
                "pairs": pairs,
            },
            "mean_trained_length": float(np.mean(train.lengths)),
        }

    def evaluate_run(self, run: Path) -> dict:
        model = self.load_run(run)
        return self.with_size(self.heldout().score(model, f"{self.eval_label}: {run.parent.name}/{run.name}"), model)
