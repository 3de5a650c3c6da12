"""What a quickstart folder depends on (`Settings`, saved as settings.json), and how its training runs are named."""

from __future__ import annotations

from dataclasses import dataclass

BASELINE, CAUSAL = "plain", "diito"  # the two variants every recipe trains, compared seed by seed
VARIANT_LABELS = {BASELINE: "plain distillation", CAUSAL: "DIITO"}
# A recipe's control run (`Recipe.control`, first seed): the student's own LM loss alone, no teacher signal.


@dataclass
class Settings:
    """What the outputs depend on; saved as settings.json and checked when a run is continued."""

    max_docs: int = 6000  # training paragraphs (at most)
    max_heldout_docs: int = 400
    max_words: int = 100  # longer paragraphs are cut at sentence ends
    heldout_percent: int = 10
    teacher_steps: int = 150  # adaptation of the teacher to the training text (MLM for minilm, CLM for smollm2)
    teacher_batch_size: int = 32
    teacher_learning_rate: float = 2e-3  # minilm: of the teacher's new head; smollm2: of every parameter
    teacher_encoder_learning_rate: float = 1e-4  # minilm only: of the teacher's encoder and embeddings
    steps: int = 150  # distillation optimizer steps, the same for both runs
    batch_size: int = 16
    learning_rate: float = 5e-4
    temperature: float = 2.0
    interchange_prop: float = 0.3
    seed: int = 56  # the first seed; --seeds N trains seed, seed + 1, ..., seed + N - 1
    teacher: str = "minilm"  # a key of quickstart_lib.recipes.RECIPES
    student_layers: int = 3  # blocks of the extracted student


# --tiny, for every teacher (a recipe's `tiny` adds to it); a recipe's `defaults` replace Settings' own.
TINY = dict(max_docs=150, max_heldout_docs=24, teacher_steps=3, teacher_batch_size=8, steps=3, batch_size=4)


@dataclass(frozen=True)
class RunKey:
    """One training run: a variant (plain or DIITO), a seed, a multiple of the base steps, and the neuron
    mapping when it is not the recipe's default one."""

    variant: str
    seed: int
    multiple: float = 1.0
    mapping: str | None = None

    @property
    def name(self) -> str:
        name = self.variant if self.mapping is None else f"{self.variant}_{self.mapping}"
        return name if self.multiple == 1 else f"{name}_x{self.multiple:g}"

    @property
    def path(self) -> str:
        return f"seed_{self.seed}/{self.name}"
