"""The DIITO training loop: distillation losses plus interchange intervention training.

One step (`CausalDistiller._loss_step`) reads like the method:

1. prepare the batch: MLM-corrupt base and dual independently (or CLM labels), choose the
   interchange positions and, for this step, one mapping entry with one teacher and one
   student variable;
2. teacher (no grad): base run, source run on the dual, counterfactual run on the base;
3. student: the same three runs, with gradients through all of them;
4. losses: ce / mlm / clm / mse / cos on the base runs, causal_ce / causal_cos between the
   counterfactual runs, each weighted by its alpha; terms whose alpha is 0 are not computed,
   and with both causal alphas at 0 no counterfactual run happens at all.

The LM head runs only on the positions a loss reads. Everything needed to resume a run --
student, optimizer, scheduler, grad scaler, RNGs, epoch and position -- is one checkpoint per
step (one file per rank: rank 0's holds the shared part, each its own RNGs and gradients).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

import counterfactual_utils as cf
import losses as L
from grouped_batch_sampler import GroupedBatchSampler, create_lengths_groups
from lm_seqs_dataset import LmSeqsDataset
from masking import MlmMasker, real_token_mask, sample_interchange_masks, sample_source_rows, swap_tokens
from utils import UserError, atomic_path

logger = logging.getLogger(__name__)

LOSS_NAMES = ("ce", "mlm", "clm", "mse", "cos", "causal_ce", "causal_cos")
STATE_DIR = "checkpoints"
# Settings a resumed run must share with the run that saved the state.
RESUME_MUST_MATCH = ("world_size", "batch_size", "gradient_accumulation_steps", "seed", "group_by_size")


@dataclass
class TrainState:
    """Counters of a run; saved in every checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    n_total_iter: int = 0  # micro-batches since the start (TensorBoard step, as in the original)
    n_optim_steps: int = 0  # optimizer steps, skipped ones included (the scheduler counts them too)
    n_skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    window_skipped: bool = False  # the current accumulation window saw a non-finite loss
    n_tokens: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    last_loss: dict[str, float] = field(default_factory=dict)


@dataclass
class StepPlan:
    """What one step intervenes on: variables per model, and the paired positions.

    source_rows (bs,) long, fast mode only: the dual of base row r is base row source_rows[r] of the
    same batch, so both models read the source values from their base runs (no source run).
    """

    teacher_variables: list[str]
    student_variables: list[str]
    interchange_mask: torch.Tensor  # (bs, L) bool over the base
    dual_interchange_mask: torch.Tensor  # (bs, L) bool over the dual
    source_rows: torch.Tensor | None = None


@dataclass
class ModelRuns:
    """Selected rows of one model's runs. logits (N, V), hidden (N_real, D)."""

    logits: torch.Tensor
    hidden: torch.Tensor | None
    cf_logits: torch.Tensor | None = None
    cf_hidden: torch.Tensor | None = None


class StopTraining(Exception):
    """Raised inside the loop to end training on a non-finite loss or gradient (a signal only sets a flag)."""


class DiitoRuns(nn.Module):
    """All passes of one model for one step, in a single forward.

    The student is wrapped in this module (then in DDP), so DDP sees exactly one forward per
    backward however many passes DIITO makes. The teacher uses it too, under no_grad.

    The passes: the base run; the source run on the dual, which stops after the deepest intervened
    block; the counterfactual run on the base. The LM head runs on the selected rows only. Below
    the lowest intervened block the counterfactual run computes what the base run computed, so it
    restarts from the base run's recorded output of that block when that is exact -- the model is
    in eval mode (the teacher: no dropout) -- or when fast mode allows it (a training student then
    shares the base run's dropout masks below the intervention). In fast mode the duals are rows of
    the base batch (`plan.source_rows`), so the source values come from the base run as well.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _base(self, input_ids, attention_mask, select, hidden_rows) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = cf.backbone(self.model)(
            input_ids=input_ids, attention_mask=attention_mask, **cf.get_adapter(self.model).forward_kwargs
        )
        return self._rows(out.last_hidden_state, select, hidden_rows)

    def _rows(self, h: torch.Tensor, select, hidden_rows) -> tuple[torch.Tensor, torch.Tensor | None]:
        return cf.lm_head_logits(self.model, h[select]), (h[hidden_rows] if hidden_rows is not None else None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        select: torch.Tensor,
        hidden_rows: torch.Tensor | None,
        plan: StepPlan | None = None,
        dual_ids: torch.Tensor | None = None,
        dual_attention_mask: torch.Tensor | None = None,
        cf_input_ids: torch.Tensor | None = None,
        variables: list[str] | None = None,
    ) -> ModelRuns:
        """select (bs, L) bool: rows that get logits; hidden_rows (bs, L) bool or None: rows of hidden states.

        With `plan`: also the counterfactual run, either a hidden-state interchange of `variables`
        (source run on `dual_ids`, or base rows `plan.source_rows`) or, with `cf_input_ids`, a plain
        run on token-swapped input.
        """
        if plan is None or cf_input_ids is not None:
            runs = ModelRuns(*self._base(input_ids, attention_mask, select, hidden_rows))
            if plan is not None:
                runs.cf_logits, runs.cf_hidden = self._base(cf_input_ids, attention_mask, select, hidden_rows)
            return runs
        masks = (plan.interchange_mask, plan.dual_interchange_mask)
        fast = plan.source_rows is not None
        if not fast and self.model.training:
            # Dropout draws new masks in every run: the counterfactual run recomputes every block.
            # The three runs' token embeddings come from one lookup (one embedding backward).
            with cf.shared_token_embeddings(self.model, [input_ids, dual_ids]):
                runs = ModelRuns(*self._base(input_ids, attention_mask, select, hidden_rows))
                source = cf.get_activation_at(self.model, dual_ids, dual_attention_mask, variables)
                out = cf.interchange_with_activation_at(
                    self.model, input_ids, attention_mask, source, variables, *masks, compute_logits=False
                )
        else:
            layers = sorted({cf.parse_variable_name(name)[0] for name in variables})
            # Recorded: the lowest intervened block's output (where the restart begins) and, in fast
            # mode, every intervened block's output (the source values).
            record = {layers[0] + 1} | ({k + 1 for k in layers} if fast else set())
            with cf.record_block_inputs(self.model, record) as cache:
                runs = ModelRuns(*self._base(input_ids, attention_mask, select, hidden_rows))
            if fast:
                source = cf.activations_from_cache(self.model, cache, variables, rows=plan.source_rows)
            else:
                source = cf.get_activation_at(self.model, dual_ids, dual_attention_mask, variables)
            out = cf.run_blocks_above(self.model, cache, layers[0], source, variables, *masks, compute_logits=False)
        runs.cf_logits, runs.cf_hidden = self._rows(out.last_hidden_state, select, hidden_rows)
        return runs


class CausalDistiller:
    """Trains `student` to imitate `teacher`'s outputs and counterfactual behaviour."""

    def __init__(
        self,
        params: Any,
        dataset: LmSeqsDataset,
        token_probs: torch.Tensor | None,
        student: nn.Module,
        teacher: nn.Module,
        neuron_mapping: list[tuple[list[str], list[str]]] | None,
    ):
        self.params = params
        self.dump_path = Path(params.dump_path)
        self.is_master = params.is_master
        self.multi_gpu = params.multi_gpu
        self.device = torch.device(params.device)
        self.mlm = params.mlm
        self.dataset = dataset
        self.student = student
        self.teacher = teacher.eval()
        self.mapping = neuron_mapping
        self.alphas = {name: float(getattr(params, f"alpha_{name}")) for name in LOSS_NAMES}
        self.causal = self.alphas["causal_ce"] > 0 or self.alphas["causal_cos"] > 0
        self.temperature = params.temperature
        self.special = params.special_tok_ids
        self.vocab_size = student.config.vocab_size

        # Data: every rank shards each epoch; the sampler reshuffles per epoch (set_epoch).
        self.sampler = DistributedSampler(
            dataset, num_replicas=params.world_size, rank=params.global_rank, shuffle=True, seed=params.seed
        )
        groups = create_lengths_groups(dataset.lengths, k=0 if params.group_by_size else 1)
        self.batch_sampler = GroupedBatchSampler(self.sampler, groups, params.batch_size)
        self.batches_per_epoch = len(self.batch_sampler)

        if self.mlm:
            self.masker = MlmMasker(
                token_probs=token_probs.float().to(self.device),
                pred_probs=torch.tensor([params.word_mask, params.word_keep, params.word_rand], device=self.device),
                mask_prop=params.mlm_mask_prop,
                mask_id=self.special["mask_token"],
                vocab_size=self.vocab_size,
            )
        # Positions and MLM corruption draw from this generator; rank-specific (data differs).
        self.generator = torch.Generator(device=self.device).manual_seed(params.seed + params.global_rank)
        # The mapping entry of a step must be the same on every rank: its own seeded stream.
        self.mapping_rng = random.Random(params.seed)

        self.state = TrainState()
        self.accum = params.gradient_accumulation_steps
        self.num_steps_total = (
            params.max_steps if params.max_steps > 0 else math.ceil(self.batches_per_epoch / self.accum) * params.n_epoch
        )
        self.optimizer = self._build_optimizer()
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer,
            num_warmup_steps=math.ceil(self.num_steps_total * params.warmup_prop),
            num_training_steps=self.num_steps_total,
        )
        self.amp_dtype = torch.float16 if params.fp16 else torch.bfloat16 if params.bf16 else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=bool(params.fp16))

        self.student_runs = DiitoRuns(student)
        self.teacher_runs = DiitoRuns(self.teacher)
        if self.multi_gpu:
            from torch.nn.parallel import DistributedDataParallel

            # Only the student is wrapped (the teacher takes no gradients). No find_unused_parameters:
            # the student's source run stops below the top blocks, but its base run uses every
            # trainable parameter, LM head included (alpha_mlm or alpha_clm is always > 0), and
            # frozen embeddings have requires_grad False, so every backward reaches them all.
            # Should a change leave one out, DDP fails loudly at the next step rather than silently.
            self.student_runs = DistributedDataParallel(
                self.student_runs,
                device_ids=[params.local_rank] if self.device.type == "cuda" else None,
                output_device=params.local_rank if self.device.type == "cuda" else None,
            )

        self._stop_requested: str | None = None  # set by this process's signal handler
        self.stop_reason: str | None = None  # the same on every rank: set when all ranks agree
        self.tensorboard = None  # opened by train(), once the resume step is known
        self.last_log_time = time.time()
        self.last_log_tokens = 0

    # --- set-up -----------------------------------------------------------------------------

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; no weight decay on biases and on every LayerNorm weight (any 1-D parameter)."""
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.params.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.params.learning_rate, eps=self.params.adam_epsilon, betas=(0.9, 0.98))

    # --- one step -------------------------------------------------------------------------------

    def _prepare(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bs, L) ids and lengths -> model input ids and labels (MLM targets or CLM next tokens)."""
        if self.mlm:
            return self.masker(token_ids, lengths, self.generator)
        labels = token_ids.masked_fill(~real_token_mask(lengths, token_ids.size(1)), L.IGNORE_INDEX)
        return token_ids, labels

    def _loss_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        """One (base, dual) batch -> (weighted total loss, named float metrics)."""
        token_ids, lengths, dual_ids, dual_lengths = (t.to(self.device, non_blocking=True) for t in batch)
        seq_len, dual_len = token_ids.size(1), dual_ids.size(1)
        attn = real_token_mask(lengths, seq_len)
        input_ids, labels = self._prepare(token_ids, lengths)
        # Rows that get logits: the CE positions (all real tokens, or MLM targets only).
        if self.mlm:
            select = labels != L.IGNORE_INDEX if self.params.restrict_ce_to_mask else attn
            sel_labels = labels[select]
        else:
            select = attn
            # Next-token labels aligned with each position (the last real token has none).
            next_labels = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), L.IGNORE_INDEX)], 1)
            sel_labels = next_labels[select]
        need_hidden = self.alphas["cos"] > 0 or self.alphas["causal_cos"] > 0
        hidden_rows = attn if need_hidden else None
        model_mask = attn.long() if self.mlm else None  # CLM batches run without a mask, as in HF

        plan, cf_kwargs_t, cf_kwargs_s = None, {}, {}
        if self.causal:
            fast_mode, source_rows = getattr(self.params, "fast_mode", False), None
            if fast_mode:
                # Not the original: the duals are other rows of this batch, as the base runs saw them.
                source_rows = sample_source_rows(lengths.size(0), self.generator)
                dual_input_ids, dual_lengths, dual_len = input_ids[source_rows], lengths[source_rows], seq_len
            else:
                dual_input_ids, _ = self._prepare(dual_ids, dual_lengths)
            t_vars, s_vars = cf.sample_interchange_variables(self.mapping, self.mapping_rng)
            imask, dmask = sample_interchange_masks(
                lengths, dual_lengths, seq_len, dual_len,
                prop=self.params.interchange_prop,
                max_token=self.params.interchange_max_token,
                consecutive=self.params.interchange_consecutive_only,
                masked_tokens=(labels != L.IGNORE_INDEX) if self.params.interchange_masked_token_only else None,
                generator=self.generator,
            )
            plan = StepPlan(t_vars, s_vars, imask, dmask, source_rows)
            if self.params.data_augment:
                swapped = swap_tokens(input_ids, dual_input_ids, imask, dmask)
                cf_kwargs_t = cf_kwargs_s = dict(cf_input_ids=swapped)
            else:
                dual_model_mask = real_token_mask(dual_lengths, dual_len).long() if self.mlm else None
                common = {} if fast_mode else dict(dual_ids=dual_input_ids, dual_attention_mask=dual_model_mask)
                cf_kwargs_t = dict(common, variables=t_vars)
                cf_kwargs_s = dict(common, variables=s_vars)

        with self._autocast():
            with torch.no_grad():
                t = self.teacher_runs(input_ids, model_mask, select, hidden_rows, plan, **cf_kwargs_t)
            s = self.student_runs(input_ids, model_mask, select, hidden_rows, plan, **cf_kwargs_s)

        terms = self._loss_terms(s, t, sel_labels)
        total = sum(self.alphas[k] * v for k, v in terms.items())
        metrics = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        metrics["loss"] = float(total.detach())
        if self.causal:
            metrics["interchange_accuracy"] = self._interchange_accuracy(s, t, sel_labels)
        self.state.n_tokens += int(lengths.sum()) * self.params.world_size
        return total, metrics

    def _loss_terms(self, s: ModelRuns, t: ModelRuns, sel_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        a, T = self.alphas, self.temperature
        terms: dict[str, torch.Tensor] = {}
        if a["ce"] > 0:
            terms["ce"] = L.ce_loss(s.logits, t.logits, T)
        lm_logits, lm_labels = s.logits, sel_labels
        if self.mlm and not self.params.restrict_ce_to_mask:
            # About 15% of the rows are MLM targets: no log-softmax over the vocabulary for the others.
            targets = sel_labels != L.IGNORE_INDEX
            lm_logits, lm_labels = s.logits[targets], sel_labels[targets]
        if a["mlm"] > 0:
            terms["mlm"] = L.mlm_loss(lm_logits, lm_labels)
        if a["clm"] > 0:
            terms["clm"] = L.mlm_loss(lm_logits, lm_labels)  # next-token labels: the same cross-entropy
        if a["mse"] > 0:
            terms["mse"] = L.mse_loss(s.logits, t.logits)
        if a["cos"] > 0:
            terms["cos"] = L.cos_loss(s.hidden, t.hidden)
        if a["causal_ce"] > 0:
            terms["causal_ce"] = L.ce_loss(s.cf_logits, t.cf_logits, T)
        if a["causal_cos"] > 0:
            terms["causal_cos"] = L.cos_loss(s.cf_hidden, t.cf_hidden)
        return terms

    def _interchange_accuracy(self, s: ModelRuns, t: ModelRuns, sel_labels: torch.Tensor) -> float:
        """Top-1 agreement of the counterfactual runs where a prediction is made.

        MLM: the base's masked positions; CLM: every real position (each predicts a token).
        """
        rows = sel_labels != L.IGNORE_INDEX
        return float(L.top1_agreement(s.cf_logits.detach()[rows], t.cf_logits[rows]))

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- optimisation ------------------------------------------------------------------------

    def _forward_backward(self, batch: tuple[torch.Tensor, ...], sync: bool) -> dict[str, float]:
        """Loss and backward of one (sub-)step; gradients are all-reduced across ranks only if `sync`.

        DDP arms its all-reduce in the forward, so `no_sync` has to cover the forward too.
        """
        no_sync = self.student_runs.no_sync() if self.multi_gpu and not sync else contextlib.nullcontext()
        with no_sync:
            loss, metrics = self._loss_step(batch)
            if self._agree(finite=bool(torch.isfinite(loss.detach()))):
                self.scaler.scale(loss / self.accum).backward()
            else:
                self._nonfinite(f"loss at micro-batch {self.state.n_total_iter + 1}")
        return metrics

    def _agree(self, finite: bool) -> bool:
        """What every rank decides together, in one all-reduce per sub-step.

        Returns whether the loss is finite on all ranks, and turns a stop signal received by any
        rank into `stop_reason` on all of them, so no rank waits alone at the next collective.
        """
        flags = torch.tensor([float(not finite), float(self._stop_requested is not None)], device=self.device)
        if self.multi_gpu:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        any_bad, any_stop = flags.tolist()
        if any_stop and self.stop_reason is None:
            self.stop_reason = self._stop_requested or "a signal on another rank"
        return any_bad == 0.0

    def _nonfinite(self, what: str) -> None:
        """Stop with a message, or (--skip_nonfinite_loss) drop the current accumulation window."""
        st = self.state
        if not self.params.skip_nonfinite_loss:
            raise StopTraining(
                f"non-finite {what} (epoch {st.epoch}, optimizer step {st.n_optim_steps}); the last good "
                "checkpoint is kept. Lower the learning rate, use --bf16 instead of --fp16, "
                "or pass --skip_nonfinite_loss"
            )
        if self.is_master and not st.window_skipped:
            logger.warning("non-finite %s: this optimizer step is skipped", what)
        st.window_skipped = True
        self.optimizer.zero_grad(set_to_none=True)

    def _optimizer_step(self) -> float | None:
        """Unscale, clip, step, schedule, zero. Returns the grad norm before clipping (None if skipped).

        A skipped window still advances the scheduler and the step count, so --max_steps ends.
        """
        st = self.state
        norm = None
        if not st.window_skipped:
            self.scaler.unscale_(self.optimizer)
            norm = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.params.max_grad_norm))
            # GradScaler skips an fp16 step with inf gradients itself (and lowers the scale); without
            # it, a non-finite norm would write NaN into the weights. Gradients are all-reduced, so
            # every rank sees the same norm and decides alike.
            if not self.scaler.is_enabled() and not math.isfinite(norm):
                self._nonfinite("gradient norm")
        if st.window_skipped:
            st.n_skipped_steps += 1
            st.window_skipped = False
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.n_optim_steps += 1
        return norm

    # --- the loop ------------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, ...]]:
        self.batch_sampler.set_epoch(epoch)
        loader = DataLoader(
            self.dataset,
            batch_sampler=_SkipBatches(self.batch_sampler, skip),
            collate_fn=self.dataset.batch_sequences,
            num_workers=self.params.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: otherwise each epoch's iterator draws a worker seed from the global
            # torch RNG (dropout's), and a run resumed mid-epoch would draw it at another point.
            generator=torch.Generator().manual_seed(self.params.seed + epoch),
        )
        yield from loader

    def train(self) -> str | None:
        """Train to the end, or until a signal: then the state is saved and its name returned."""
        p, st = self.params, self.state
        if self.is_master:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, hide the events a killed run logged after its last saved state.
            self.tensorboard = SummaryWriter(
                log_dir=str(self.dump_path / "log" / "train"), flush_secs=60, purge_step=st.n_total_iter or None
            )
            logger.info(
                "Training: %d sequences, %d batches/epoch/process, effective batch %d x %d x %d = %d sequences, "
                "%d optimizer steps", len(self.dataset), self.batches_per_epoch, p.batch_size, self.accum,
                p.world_size, p.batch_size * self.accum * p.world_size, self.num_steps_total,
            )
            if st.n_total_iter == 0:
                self._log_configs()
        self.student.train()
        previous_handlers = self._install_signal_handlers()
        try:
            return self._train_loop()
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _train_loop(self) -> str | None:
        p, st = self.params, self.state
        while st.epoch < p.n_epoch and not self._reached_max_steps():
            batches = self._epoch_batches(st.epoch, st.batch_in_epoch)
            bar = tqdm(
                batches, desc=f"epoch {st.epoch}", initial=st.batch_in_epoch, total=self.batches_per_epoch,
                disable=not self.is_master, dynamic_ncols=True,
            )
            for batch in bar:
                self._train_micro_batch(batch)
                if self.is_master:
                    bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in st.last_loss.items()})
                if self.stop_reason or self._reached_max_steps():
                    break
            bar.close()
            if self._reached_max_steps():
                break
            if self.stop_reason:
                self.save_state()
                if self.is_master:
                    logger.warning(
                        "Stopped by %s after micro-batch %d; the state is saved: continue with --resume.",
                        self.stop_reason, st.n_total_iter,
                    )
                return self.stop_reason
            self._end_epoch()
        # Gradients left from a partial accumulation (max_steps reached mid-way) are dropped.
        self.optimizer.zero_grad(set_to_none=True)
        if self.is_master:
            self.save_final()
        return None

    def _train_micro_batch(self, batch) -> None:
        p, st = self.params, self.state
        # The last micro-batch of a window, or of the epoch, all-reduces and steps.
        sync = (st.batch_in_epoch + 1) % self.accum == 0 or st.batch_in_epoch + 1 == self.batches_per_epoch
        if p.include_crossway:
            # Second sub-step with roles swapped: (dual, base). Both add to the same gradients.
            metrics = self._forward_backward(batch, sync=False)
            metrics_back = self._forward_backward(_crossway(*batch), sync=sync)
            metrics = {k: (metrics[k] + metrics_back[k]) / 2 for k in metrics}
        else:
            metrics = self._forward_backward(batch, sync=sync)
        st.batch_in_epoch += 1
        st.n_total_iter += 1
        st.last_loss = {k: v for k, v in metrics.items() if k.startswith("loss")}
        st.epoch_loss_sum += metrics["loss"]
        st.epoch_loss_count += 1
        log_now = self.is_master and st.n_total_iter % p.log_interval == 0
        if log_now:
            self._log_parameters()  # before the step zeroes the gradients
        grad_norm = self._optimizer_step() if sync else None
        if log_now:
            self._log(metrics, grad_norm)
        if st.n_total_iter % p.checkpoint_interval == 0:
            self.save_state()
            if self.is_master:
                self._save_student("checkpoint.pth")

    def _reached_max_steps(self) -> bool:
        return self.params.max_steps > 0 and self.state.n_optim_steps >= self.params.max_steps

    def _end_epoch(self) -> None:
        st = self.state
        if self.is_master:
            self._save_student(f"model_epoch_{st.epoch}.pth")
            self.tensorboard.add_scalar("epoch/loss", st.epoch_loss_sum / max(st.epoch_loss_count, 1), st.epoch)
        logger.info("Epoch %d done", st.epoch)
        st.epoch += 1
        st.batch_in_epoch = 0
        st.epoch_loss_sum, st.epoch_loss_count = 0.0, 0

    # --- signals ------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict:
        """SIGTERM / SIGINT ask for a stop at the next micro-batch (state saved); a second Ctrl-C aborts."""

        def handler(signum, _frame):
            if signum == signal.SIGINT and self._stop_requested is not None:
                raise KeyboardInterrupt
            self._stop_requested = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        return previous

    # --- logging ------------------------------------------------------------------------------

    def _log_configs(self) -> None:
        tb = self.tensorboard
        tb.add_text("config", f"<pre>{_json(vars(self.params))}</pre>", 0)
        tb.add_text("config/student", f"<pre>{self.student.config.to_json_string()}</pre>", 0)

    def _log_parameters(self) -> None:
        tb, step = self.tensorboard, self.state.n_total_iter
        for name, param in self.student.named_parameters():
            tb.add_scalar(f"parameter_mean/{name}", param.data.mean(), step)
            tb.add_scalar(f"parameter_std/{name}", param.data.std(), step)
            if param.grad is not None:
                tb.add_scalar(f"grad_mean/{name}", param.grad.data.mean(), step)
                tb.add_scalar(f"grad_std/{name}", param.grad.data.std(), step)

    def _log(self, metrics: dict[str, float], grad_norm: float | None) -> None:
        tb, step, st = self.tensorboard, self.state.n_total_iter, self.state
        tb.add_scalar("losses/cum_avg_loss_epoch", st.epoch_loss_sum / max(st.epoch_loss_count, 1), step)
        for key, value in metrics.items():
            tag = "losses/loss" if key == "loss" else f"losses/{key}" if key.startswith("loss_") else f"metrics/{key}"
            tb.add_scalar(tag, value, step)
        tb.add_scalar("learning_rate/lr", self.scheduler.get_last_lr()[0], step)
        if grad_norm is not None:
            tb.add_scalar("global/grad_norm", grad_norm, step)
        tb.add_scalar("global/memory_usage", psutil.Process(os.getpid()).memory_info().rss / 1e6, step)
        now = time.time()
        tb.add_scalar("global/speed", now - self.last_log_time, step)
        tb.add_scalar("global/tokens_per_s", (st.n_tokens - self.last_log_tokens) / max(now - self.last_log_time, 1e-9), step)
        tb.add_scalar("global/skipped_steps", st.n_skipped_steps, step)
        self.last_log_time, self.last_log_tokens = now, st.n_tokens

    # --- saving and resuming ------------------------------------------------------------------

    def _save_student(self, name: str) -> None:
        save_atomically(self.student.state_dict(), self.dump_path / name)

    def save_final(self) -> None:
        """`pytorch_model.bin` (state dict, original name) and a `from_pretrained` folder."""
        self.student.config.save_pretrained(self.dump_path)
        self.student.save_pretrained(self.dump_path)
        self._save_student("pytorch_model.bin")
        if self.tensorboard is not None:
            self.tensorboard.flush()
        logger.info("Saved the student in %s", self.dump_path)

    def _run_settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run that saved the state: the batches, their
        order and the random streams follow from these."""
        return {**{k: getattr(self.params, k) for k in RESUME_MUST_MATCH}, "n_sequences": len(self.dataset)}

    def state_dict(self) -> dict[str, Any]:
        """This rank's training state.

        Every rank's holds its own random streams (masking and positions are drawn per rank,
        dropout differs with the data) and, mid-accumulation, its gradients not yet all-reduced:
        both are needed to continue exactly. Rank 0's also holds what the ranks share (student,
        optimizer, scheduler, grad scaler), written once rather than once per rank.
        """
        grads = None
        if self.state.batch_in_epoch % self.accum != 0:  # mid-accumulation: keep the partial sum
            grads = [p.grad for p in self.student.parameters()]
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "generator": self.generator.get_state(),
            "mapping": self.mapping_rng.getstate(),
        }
        out = {
            "grads": grads,
            "rng": rng,
            "state": asdict(self.state),
            "run": self._run_settings(),
            "global_rank": self.params.global_rank,
        }
        if self.params.global_rank == 0:
            out.update(
                student=self.student.state_dict(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(),
            )
        return out

    def save_state(self) -> None:
        """Write this rank's state atomically; once every rank has, keep the newest `save_total_limit`."""
        folder, rank = self.dump_path / STATE_DIR, self.params.global_rank
        save_atomically(self.state_dict(), folder / state_file_name(self.state.n_total_iter, rank))
        if self.multi_gpu:
            dist.barrier()  # a kill before every rank has the new state must leave a common older one
        for old in sorted(folder.glob(f"state_*_rank{rank}.pth"))[: -self.params.save_total_limit]:
            old.unlink()
        for partial in folder.glob(f".state_*_rank{rank}.pth.*.tmp"):  # left by a killed write
            partial.unlink()

    def resume(self) -> None:
        """Load the newest state that every rank has saved (UserError if there is none).

        Each rank reads its own file and rank 0's (the shared part), so the run folder must be on
        a file system all nodes see, as it is for the launch itself on a cluster.
        """
        folder, rank = self.dump_path / STATE_DIR, self.params.global_rank
        steps = saved_steps(folder, rank)
        if self.multi_gpu:
            everyone: list[Any] = [None] * self.params.world_size
            dist.all_gather_object(everyone, steps)
            steps = sorted(set.intersection(*(set(s) for s in everyone)))
        if not steps:
            raise UserError(f"--resume: no state in {folder} that all {self.params.world_size} process(es) saved")
        own_path, shared_path = (folder / state_file_name(steps[-1], r) for r in (rank, 0))
        try:
            own = torch.load(own_path, map_location="cpu", weights_only=False)
            shared = own if rank == 0 else torch.load(shared_path, map_location="cpu", weights_only=False)
        except FileNotFoundError as e:
            raise UserError(f"--resume: cannot read {e.filename}: is {folder} shared by all nodes?") from None
        now = self._run_settings()
        mismatch = [f"{k}={v} (this run: {now.get(k)})" for k, v in shared["run"].items() if now.get(k) != v]
        if mismatch:
            raise UserError(f"--resume: {shared_path} was saved with {', '.join(mismatch)}; resume with those")
        self.student.load_state_dict(shared["student"])
        self.optimizer.load_state_dict(shared["optimizer"])
        self.scheduler.load_state_dict(shared["scheduler"])
        if shared["scaler"]:  # empty when the saving run had no --fp16: a new scaler then starts afresh
            self.scaler.load_state_dict(shared["scaler"])
        if own["grads"] is not None:
            for p, g in zip(self.student.parameters(), own["grads"]):
                p.grad = None if g is None else g.to(p.device)
        rng = own["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.generator.set_state(rng["generator"])
        self.mapping_rng.setstate(rng["mapping"])
        self.state = TrainState(**own["state"])
        self.last_log_tokens = self.state.n_tokens
        if self.is_master:
            logger.info(
                "Resumed from %s: epoch %d, micro-batch %d of the epoch, %d optimizer steps",
                own_path, self.state.epoch, self.state.batch_in_epoch, self.state.n_optim_steps,
            )


def state_file_name(n_total_iter: int, global_rank: int) -> str:
    return f"state_{n_total_iter:010d}_rank{global_rank}.pth"


def saved_steps(folder: Path, global_rank: int) -> list[int]:
    """Micro-batch counts at which this rank has a complete state file in `folder`, ascending.

    Partial writes are hidden temporary files (`.state_...tmp`) and never match.
    """
    return sorted(int(path.name.split("_")[1]) for path in folder.glob(f"state_*_rank{global_rank}.pth"))


def save_atomically(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, synced to disk, then renamed onto `path`.

    A kill or a crash at any point leaves either the previous file or the complete new one.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class _SkipBatches(Sampler[list[int]]):
    """A batch sampler that drops the first `skip` batches of an epoch (resuming mid-epoch)."""

    def __init__(self, batch_sampler: GroupedBatchSampler, skip: int):
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self):
        for i, b in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield b

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)


def _crossway(token_ids, lengths, dual_ids, dual_lengths):
    """(base, dual) -> (dual, base), cut to the dual's longest length as collation would.

    The dual is already padded or cut to the base's width, so the new width never exceeds it.
    """
    width = int(dual_lengths.max())
    return dual_ids[:, :width], dual_lengths, token_ids[:, :width], lengths.clamp(max=width)


def _json(obj: dict) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True, default=str)
