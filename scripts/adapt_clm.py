"""Adapt a pretrained causal LM to a corpus with the causal-LM loss, so that it is a teacher worth distilling.

    python scripts/adapt_clm.py --model_name models/SmolLM2-135M-Instruct \\
        --data_file data/binarized_text.train.smollm2-135m-instruct.pickle \\
        --heldout_file data/binarized_text.heldout.smollm2-135m-instruct.pickle \\
        --output_dir teachers/smollm2-135m-adapted --steps 40 --batch_size 8 --learning_rate 1e-4

A pretrained decoder that never saw the distillation text is a poor teacher for it: a student trained
with the CLM loss alone learns the text faster than it learns the teacher, and then outscores it
(the decoder quickstart measured this with SmolLM2 before adaptation). This script fine-tunes every
parameter with the next-token cross-entropy on the training corpus (AdamW, linear warm-up and decay)
and saves the adapted model as a `from_pretrained` folder (config, safetensors weights, tokenizer)
that `--teacher_name` and `scripts/extract.py --model_name` accept. Any decoder family of
architectures.py works.

Sequences are framed and chunked as for distillation (`clm_eval.make_dataset`); a step trains on
`--batch_size` of them drawn without replacement (reshuffled each pass). The held-out report is
`clm_eval`'s: perplexity and next-token accuracy over every position of the held-out sequences, before
and after, in `clm_adaptation.json` inside the folder. That file is written last and the folder is
moved into place whole, so a folder holding it is complete; an interrupted run leaves no half model.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer, get_linear_schedule_with_warmup  # noqa: E402

import clm_eval  # noqa: E402
from architectures import ARCHITECTURES, backbone, get_architecture, lm_head_logits  # noqa: E402
from losses import IGNORE_INDEX  # noqa: E402
from masking import real_token_mask  # noqa: E402
from mlm_eval import collate, load_store  # noqa: E402
from scripts.extraction import load_teacher  # noqa: E402
from utils import UserError, first_line, replacing_folder, run_cli, set_seed, write_json  # noqa: E402

logger = logging.getLogger("adapt_clm")

RESULTS_FILE = "clm_adaptation.json"  # written last: its presence means the folder is complete
CAUSAL_TYPES = sorted(name for name, row in ARCHITECTURES.items() if row.objective == "clm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--model_name", required=True, help=f"Folder (or Hub id) of a causal LM: {', '.join(CAUSAL_TYPES)}.")
    a("--data_file", required=True, help="Binarized training corpus (*.pickle or *.tokens.npy), same tokenizer.")
    a("--heldout_file", required=True, help="Binarized held-out corpus, scored before and after.")
    a("--output_dir", required=True, help="Where the adapted model folder is written.")
    a("--overwrite_output_dir", action="store_true", help="Replace an adapted model already in --output_dir.")
    a("--steps", type=int, default=40, help="Optimizer steps.")
    a("--batch_size", type=int, default=8, help="Sequences per step.")
    a("--learning_rate", type=float, default=1e-4, help="Peak learning rate of every parameter.")
    a("--warmup_prop", type=float, default=0.1, help="Share of the steps with linear warm-up (then linear decay).")
    a("--weight_decay", type=float, default=0.01)
    a("--eval_batch_size", type=int, default=16)
    a("--seed", type=int, default=56)
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.learning_rate > 0 or not math.isfinite(args.learning_rate):
        raise UserError(f"--learning_rate must be a positive number, got {args.learning_rate}")
    if not 0 <= args.warmup_prop < 1 or args.weight_decay < 0:
        raise UserError("--warmup_prop must be in [0, 1) and --weight_decay >= 0")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2**32), got {args.seed}")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not (out / RESULTS_FILE).is_file():
            raise UserError(f"--output_dir {out} is not empty and holds no {RESULTS_FILE}: choose another folder")
        if not args.overwrite_output_dir:
            raise UserError(f"{out} already holds an adapted model: pass --overwrite_output_dir to replace it")


def load_causal_lm(name: str):
    """The model (its family's LM class) and its tokenizer; anything but a causal LM is refused."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"--model_name: cannot read the config of {name}: {first_line(e)}") from None
    row = ARCHITECTURES.get(config.model_type)
    if row is None or row.objective != "clm":
        raise UserError(f"--model_name: {name} is a {config.model_type} model, not a causal LM ({CAUSAL_TYPES})")
    model = load_teacher(row.lm_cls(), name, head_prefix="lm_head.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"--model_name: cannot load the tokenizer of {name}: {first_line(e)}") from None
    return model, tokenizer


def next_token_targets(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(bs, L) the next token at positions 0 .. length - 2, IGNORE_INDEX elsewhere (last token, padding)."""
    targets = torch.cat([ids[:, 1:], ids.new_full((ids.size(0), 1), IGNORE_INDEX)], 1)
    return targets.masked_fill(~real_token_mask(lengths - 1, ids.size(1)), IGNORE_INDEX)


def clm_step_loss(model, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real positions of a right-padded batch. (Padding sits after
    every real token, so a causal model's real positions never see it: no attention mask is needed.)"""
    targets = next_token_targets(ids, lengths)
    rows = targets != IGNORE_INDEX
    hidden = backbone(model)(input_ids=ids, **get_architecture(model).forward_kwargs).last_hidden_state
    return F.cross_entropy(lm_head_logits(model, hidden[rows]).float(), targets[rows])


def heldout_scores(model, batches: list[clm_eval.ClmBatch], n: int, desc: str) -> dict[str, float]:
    return clm_eval.HeldoutClm.lm_scores(clm_eval.model_predictions(model, batches, None, desc), n)


def save_folder(model, tokenizer, results: dict, out: Path) -> None:
    """Write the folder beside `out`, then move it in: `out` is either the old folder or the new one."""
    try:
        with replacing_folder(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(results, tmp / RESULTS_FILE)
    except OSError as e:
        raise UserError(f"cannot save the adapted model in {out}: {first_line(e)}") from None


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    set_seed(args.seed)
    model, tokenizer = load_causal_lm(args.model_name)
    vocab = model.config.vocab_size
    train = clm_eval.make_dataset(load_store(args.data_file, vocab), tokenizer, model.config, args.seed)
    heldout = clm_eval.make_dataset(load_store(args.heldout_file, vocab), tokenizer, model.config, args.seed)
    if len(train) < args.batch_size:
        raise UserError(f"--data_file has {len(train)} sequences, fewer than --batch_size {args.batch_size}")
    batches = clm_eval.heldout_batches(heldout, args.eval_batch_size, args.seed, interchange_prop=0.3)
    n_heldout = int(sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches))
    before = heldout_scores(model, batches, n_heldout, "held-out CLM: before")
    logger.info("Held-out before: perplexity %.2f, accuracy %.2f%%", before["perplexity"], 100 * before["accuracy"])

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_prop * args.steps), args.steps)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "Adapting %s (%d parameters): %d steps x %d sequences of %d training sequences",
        args.model_name,
        n_params,
        args.steps,
        args.batch_size,
        len(train),
    )
    generator = torch.Generator().manual_seed(args.seed)
    order, cursor = torch.randperm(len(train), generator=generator), 0
    model.train()
    start, losses = time.time(), []
    bar = tqdm(range(args.steps), desc="adapt CLM")
    for _ in bar:
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        ids, lengths = collate(train, order[cursor : cursor + args.batch_size].numpy())
        cursor += args.batch_size
        loss = clm_step_loss(model, ids, lengths)
        if not torch.isfinite(loss):
            raise UserError(f"the loss is {loss.item()} at step {len(losses) + 1}: lower --learning_rate")
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    train_seconds = time.time() - start
    model.eval()
    after = heldout_scores(model, batches, n_heldout, "held-out CLM: after")
    logger.info(
        "Held-out after %d steps (%.0f s): perplexity %.2f, accuracy %.2f%%",
        args.steps,
        train_seconds,
        after["perplexity"],
        100 * after["accuracy"],
    )
    results = {
        "args": vars(args),
        "heldout_before": before,
        "heldout": after,
        "train_losses": losses,
        "train_seconds": round(train_seconds, 1),
        "trained_parameters": n_params,
    }
    save_folder(model, tokenizer, results, Path(args.output_dir))
    logger.info("Saved the adapted model in %s", args.output_dir)
    return results


if __name__ == "__main__":
    run_cli(main)
