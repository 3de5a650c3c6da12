"""The DIITO training loop: distillation losses plus interchange intervention training.

One step (`CausalDistiller._loss_step`) reads like the method:

1. plan (`_plan`): MLM-corrupt base and dual independently (or CLM labels), pick the rows the
   losses read and, for a DIITO step, the mode of its counterfactual run, the interchanged
   positions and one mapping entry with one teacher and one student variable;
2. teacher (no grad): base run, and the counterfactual run the plan's mode calls for;
3. student: the same runs, with gradients through all of them;
4. losses: the terms of `losses.LOSS_TERMS` whose alpha is non-zero, weighted and summed; with both
   causal alphas at 0 no counterfactual run happens at all.

The LM head runs only on the positions a loss reads. What a step computes is `step_plan.py`'s,
the runs of each model `diito_runs.py`'s. The distiller owns its training state (`state_dict`,
`load_state_dict`); the file layout and the resume rules are `checkpointing.py`'s, the logs
`training_log.py`'s and the student's files `student_files.py`'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import checkpointing
import losses
import rank_faults
import sharding
import student_files
from checkpointing import SkipBatches, TrainState
from diito_runs import DiitoRuns, ModelRuns
from grouped_batch_sampler import GroupedBatchSampler, create_lengths_groups
from lm_seqs_dataset import LmSeqsDataset, pad_token_id
from masking import MlmMasker, real_token_mask, sample_interchange_masks, sample_source_rows
from neuron_mapping import sample_interchange_variables
from optimization import StepWindow
from step_plan import Mode, Pairing, Side, StepDraws, StepPlan, build_plan, crossway_batch, pad_to_multiple, step_mode
from stop_signals import StopSignals
from training_config import RunContext, TrainingConfig
from training_log import TrainingLog
from utils import write_json

logger = logging.getLogger(__name__)


class CausalDistiller:
    """Trains `student` to imitate `teacher`'s outputs and counterfactual behaviour.

    dataset: the corpus with its dual pairing; token_probs (vocab,): MLM target weights (None for
    CLM); neuron_mapping: (teacher variables, student variables) entries, one drawn per step
    (None without interchange runs, e.g. with --data_augment).
    run_description: logged as the TensorBoard text `config` (causal_train: parameters.json's
    content; default: the config and context); tokenizer: saved into every checkpoint-<step>/
    folder when given (causal_train: the teacher's); start_wandb: starts a Weights & Biases run
    when training starts (causal_train --is_wandb, rank 0); the logged scalars also go to it, and
    it is finished when training ends.
    """

    def __init__(
        self,
        config: TrainingConfig,
        context: RunContext,
        dataset: LmSeqsDataset,
        token_probs: torch.Tensor | None,
        student: nn.Module,
        teacher: nn.Module,
        neuron_mapping: list[tuple[list[str], list[str]]] | None,
        *,
        run_description: dict | None = None,
        tokenizer: Any = None,
        start_wandb: Callable[[], Any] | None = None,
    ):
        self.config, self.context = config, context
        self.dump_path = context.run_dir
        self.is_master = context.is_master
        self.distributed = context.multi_process  # several processes (NCCL, or gloo on CPUs)
        self.device = torch.device(context.device)
        self.mlm = config.mlm
        self.dataset = dataset
        self.corpus_fingerprint = checkpointing.corpus_fingerprint(dataset.store)
        self.student = student
        self.teacher = teacher.eval()
        self.mapping = neuron_mapping
        self.alphas = config.alphas
        self.mode = step_mode(config.causal, config.data_augment, config.fast_mode)
        self.temperature = config.temperature
        self.vocab_size = student.config.vocab_size

        # Data: every rank shards each epoch; the sampler reshuffles per epoch (set_epoch).
        self.sampler = DistributedSampler(
            dataset, num_replicas=context.world_size, rank=context.global_rank, shuffle=True, seed=config.seed
        )
        groups = create_lengths_groups(dataset.lengths, k=0 if config.group_by_size else 1)
        self.batch_sampler = GroupedBatchSampler(self.sampler, groups, config.batch_size)
        batches_per_epoch = len(self.batch_sampler)  # this rank's micro-batches per epoch

        if self.mlm:
            self.masker = MlmMasker(
                token_probs=token_probs.float().to(self.device),
                pred_probs=torch.tensor([config.word_mask, config.word_keep, config.word_rand], device=self.device),
                mask_prop=config.mlm_mask_prop,
                mask_id=context.special_token_ids["mask_token"],
                vocab_size=self.vocab_size,
            )
        # Positions and MLM corruption draw from this generator; rank-specific (data differs).
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + context.global_rank)
        # The mapping entry of a step must be the same on every rank: its own seeded stream.
        self.mapping_rng = random.Random(config.seed)

        self.student_runs = DiitoRuns(student, recompute_blocks=config.gradient_checkpointing)
        self.teacher_runs = DiitoRuns(self.teacher)
        if config.fsdp:
            # Sharded before the optimizer is built: fully_shard replaces the parameters (sharding.py).
            sharding.shard(self.student_runs, bf16=config.bf16, frozen=False, device=self.device)
            sharding.shard(
                self.teacher_runs,
                bf16=config.bf16,
                frozen=True,
                device=self.device,
                cpu_offload=config.fsdp_offload_teacher,
            )
        elif self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # Only the student is wrapped (the teacher takes no gradients). No find_unused_parameters:
            # the student's source run stops below the top blocks, but its base run uses every
            # trainable parameter, LM head included (alpha_mlm or alpha_clm is always > 0), and
            # frozen embeddings have requires_grad False, so every backward reaches them all.
            # Should a change leave one out, DDP fails loudly at the next step rather than silently.
            on_cuda = self.device.type == "cuda"
            self.student_runs = DistributedDataParallel(
                self.student_runs,
                device_ids=[context.local_rank] if on_cuda else None,
                output_device=context.local_rank if on_cuda else None,
            )

        self.state = TrainState()
        self.accum = config.gradient_accumulation_steps
        self.num_steps_total = (
            config.max_steps if config.max_steps > 0 else math.ceil(batches_per_epoch / self.accum) * config.n_epoch
        )
        self.window = StepWindow(
            student,
            config,
            device_type=self.device.type,
            batches_per_epoch=batches_per_epoch,
            num_steps_total=self.num_steps_total,
            distributed=self.distributed,
            is_master=self.is_master,
        )
        self.optimizer, self.scheduler, self.scaler = self.window.optimizer, self.window.scheduler, self.window.scaler
        self.amp_dtype = torch.float16 if config.fp16 else torch.bfloat16 if config.bf16 else None

        self.stop = StopSignals(self.distributed)  # SIGTERM / SIGINT, agreed on by every rank
        self.log: TrainingLog | None = None  # rank 0's, opened by train() once the resume step is known
        self.run_description = run_description or {}
        self.tokenizer = tokenizer
        self.start_wandb = start_wandb
        self.wandb = None  # the run start_wandb started, while training
        # --fp16 widens batches (`_plan`) with the id collation pads them with.
        self._pad_id = pad_token_id(context.special_token_ids, config.mlm) if config.fp16 else None
        self._start_time, self._start_tokens = time.time(), 0

    # --- set-up -----------------------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        return self.window.batches_per_epoch

    # --- the training state ---------------------------------------------------------------------

    def run_settings(self) -> dict[str, Any]:
        """What a run resumed from this one's states must share with it (`checkpointing.run_settings`)."""
        return checkpointing.run_settings(
            self.config, self.context.world_size, len(self.dataset), self.corpus_fingerprint
        )

    def state_dict(self) -> dict[str, Any]:
        """This rank's training state, in the layout of `checkpointing.training_state`."""
        mid_window = self.window.mid_window(self.state)  # keep the partial gradient sums
        return checkpointing.training_state(
            counters=self.state,
            rng=checkpointing.rng_state(self.device, self.generator, self.mapping_rng),
            run=self.run_settings(),
            global_rank=self.context.global_rank,
            grads=sharding.local_grads(self.student) if mid_window else None,
            # Under --fsdp every rank takes part in gathering these; rank 0 keeps them.
            student=sharding.full_model_state(self.student),
            optimizer=sharding.full_optimizer_state(self.student, self.optimizer),
            scheduler=self.scheduler,
            scaler=self.scaler,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: a rank's `state_dict()` with rank 0's shared part (student, optimizer,
        scheduler, scaler), as `checkpointing.read_resume_state` returns it.

        This run's optimisation flags hold from the resumed step on: its learning rate schedule
        (`checkpointing.load_schedule`), weight decay and epsilon replace the saved ones.
        """
        cfg = self.config
        if self.config.fsdp:
            sharding.load_full_state(self.student, self.optimizer, state["student"], state["optimizer"])
        else:
            self.student.load_state_dict(state["student"])
            checkpointing.load_optimizer_state(self.optimizer, state["optimizer"])
        checkpointing.load_schedule(self.scheduler, state["scheduler"], cfg.learning_rate)
        if state["scaler"]:  # empty when the saving run had no --fp16: a new scaler then starts afresh
            self.scaler.load_state_dict(state["scaler"])
        sharding.restore_grads(self.student, state["grads"])
        checkpointing.restore_rng(state["rng"], self.device, self.generator, self.mapping_rng)
        self.state = TrainState(**state["state"])
        saved_peak = state["scheduler"]["base_lrs"]
        if any(lr != cfg.learning_rate for lr in saved_peak):
            logger.warning(
                "--learning_rate %g (the state's: %g) applies from optimizer step %d on",
                cfg.learning_rate,
                saved_peak[0],
                self.state.n_optim_steps,
            )
        saved_lrs, lrs = [g["lr"] for g in state["optimizer"]["param_groups"]], self.scheduler.get_last_lr()
        if saved_lrs != lrs and self.is_master:
            logger.info(
                "Learning rate at the resumed step: %g (the saved schedule's: %g), for %d steps in all",
                lrs[0],
                saved_lrs[0],
                self.num_steps_total,
            )

    def resume(self) -> None:
        """--resume: continue from the newest state in <run_dir>/checkpoints that every rank can read."""
        state, path = checkpointing.read_resume_state(self.context, self.run_settings())
        self.load_state_dict(state)
        if self.is_master:
            logger.info(
                "Resumed from %s: epoch %d, micro-batch %d of the epoch, %d optimizer steps",
                path,
                self.state.epoch,
                self.state.batch_in_epoch,
                self.state.n_optim_steps,
            )

    # --- one step -------------------------------------------------------------------------------

    def _prepare(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bs, L) ids and lengths -> model input ids and labels (MLM targets or CLM next tokens)."""
        if self.mlm:
            return self.masker(token_ids, lengths, self.generator)
        labels = token_ids.masked_fill(~real_token_mask(lengths, token_ids.size(1)), losses.IGNORE_INDEX)
        return token_ids, labels

    def _plan(self, batch: tuple[torch.Tensor, ...]) -> StepPlan:
        """A (base, dual) batch -> what this step runs. Draws, in this order: the base's MLM corruption,
        the dual's (or the source rows in fast mode), the mapping entry, the interchanged positions."""
        cfg = self.config
        token_ids, lengths, dual_ids, dual_lengths = (t.to(self.device, non_blocking=True) for t in batch)
        if cfg.fp16:  # as the original did for float16 kernels: widths a multiple of 8 (padding only)
            token_ids, dual_ids = (
                pad_to_multiple(token_ids, 8, self._pad_id),
                pad_to_multiple(dual_ids, 8, self._pad_id),
            )
        base = Side(*self._prepare(token_ids, lengths), lengths)
        if self.mode is Mode.PLAIN:
            return self._build_plan(StepDraws(base))
        source_rows = None
        if cfg.fast_mode:
            # Not the original: the duals are other rows of this batch, as the base runs saw them
            # (with --data_augment too: their tokens are swapped in).
            source_rows = sample_source_rows(lengths.size(0), self.generator)
            dual = Side(base.ids[source_rows], None, lengths[source_rows])
        else:
            dual = Side(*self._prepare(dual_ids, dual_lengths), dual_lengths)
        variables = self._draw_variables()
        imask, dmask = sample_interchange_masks(
            lengths,
            dual.lengths,
            base.ids.size(1),
            dual.ids.size(1),
            prop=cfg.interchange_prop,
            max_token=cfg.interchange_max_token,
            consecutive=cfg.interchange_consecutive_only,
            masked_tokens=(base.labels != losses.IGNORE_INDEX) if cfg.interchange_masked_token_only else None,
            generator=self.generator,
        )
        return self._build_plan(StepDraws(base, Pairing(dual, imask, dmask, variables, source_rows)))

    def _draw_variables(self) -> tuple[list[str], list[str]] | None:
        """One mapping entry, (teacher variables, student variables); None with --data_augment."""
        return None if self.config.data_augment else sample_interchange_variables(self.mapping, self.mapping_rng)

    def _mirrored_plan(self, plan: StepPlan) -> StepPlan:
        """The crossway sub-step of `plan`: (dual, base) with the same corruption and mirrored positions;
        the mapping entry is drawn anew (the original drew one per sub-step)."""
        return self._build_plan(plan.draws.mirrored(self._draw_variables()))

    def _build_plan(self, draws: StepDraws) -> StepPlan:
        return build_plan(
            draws,
            mode=self.mode,
            mlm=self.mlm,
            restrict_ce_to_mask=self.config.restrict_ce_to_mask,
            need_hidden=self.alphas["cos"] > 0 or self.alphas["causal_cos"] > 0,
        )

    def _loss_step(self, batch: tuple[torch.Tensor, ...] | StepPlan) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One (base, dual) batch, or a plan already drawn -> (weighted total loss, named metrics).

        The metrics are detached float32 scalars on the device: reading them would wait for the
        device, so they are read once per accumulation window (`StepWindow.settle`).
        """
        plan = batch if isinstance(batch, StepPlan) else self._plan(batch)
        with self._autocast():
            with torch.no_grad():
                t = self.teacher_runs(plan, plan.teacher_variables)
            s = self.student_runs(plan, plan.student_variables)

        lm_logits, lm_labels = (
            (s.logits, plan.labels) if plan.lm_rows is None else (s.logits[plan.lm_rows], plan.labels[plan.lm_rows])
        )
        inputs = losses.LossInputs(s, t, lm_logits, lm_labels, self.temperature)
        terms = {name: losses.LOSS_TERMS[name](inputs) for name, alpha in self.alphas.items() if alpha > 0}
        total = sum(self.alphas[name] * term for name, term in terms.items())
        metrics = {f"loss_{k}": v.detach().float() for k, v in terms.items()}
        metrics["loss"] = total.detach().float()
        if plan.mode is not Mode.PLAIN:
            metrics["interchange_accuracy"] = self._interchange_accuracy(s, t, plan.labels)
        return total, metrics

    def _interchange_accuracy(self, s: ModelRuns, t: ModelRuns, sel_labels: torch.Tensor) -> torch.Tensor:
        """Top-1 agreement of the counterfactual runs where a prediction is made.

        MLM: the base's masked positions; CLM: every real position, the last one included (each
        predicts a next token, whether or not the corpus has it).
        """
        if not self.mlm:
            return losses.top1_agreement(s.cf_logits.detach(), t.cf_logits).float()
        rows = sel_labels != losses.IGNORE_INDEX
        return losses.top1_agreement(s.cf_logits.detach()[rows], t.cf_logits[rows]).float()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- optimisation ------------------------------------------------------------------------

    def _forward_backward(
        self, batch: tuple[torch.Tensor, ...] | StepPlan, sync: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Loss and backward of one (sub-)step; gradients are all-reduced across ranks only if `sync`.

        Returns the metrics and a (device) flag: the loss was not finite. Its gradients are then
        in the window's sum, which `StepWindow.settle` drops before any optimizer step.
        DDP arms its all-reduce in the forward, so `no_sync` has to cover the forward too. Under --fsdp
        every backward reduce-scatters its gradients, so they stay sharded (`sync` does not apply).
        """
        ddp_no_sync = self.distributed and not self.config.fsdp and not sync
        no_sync = self.student_runs.no_sync() if ddp_no_sync else contextlib.nullcontext()
        with no_sync:
            loss, metrics = self._loss_step(batch)
            self.scaler.scale(loss / self.window.size(self.state)).backward()
        return metrics, ~torch.isfinite(loss.detach())

    # --- the loop ------------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, ...]]:
        self.batch_sampler.set_epoch(epoch)
        loader = DataLoader(
            self.dataset,
            batch_sampler=SkipBatches(self.batch_sampler, skip),
            collate_fn=self.dataset.batch_sequences,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: otherwise each epoch's iterator draws a worker seed from the global
            # torch RNG (dropout's), and a run resumed mid-epoch would draw it at another point.
            generator=torch.Generator().manual_seed(self.config.seed + epoch),
        )
        yield from loader

    def train(self) -> str | None:
        """Train to the end, or until a signal: then the state is saved and its name returned."""
        self.wandb = self.start_wandb() if self.start_wandb is not None else None
        try:
            return self._train()
        finally:
            if self.wandb is not None:
                self.wandb.finish()

    def _train(self) -> str | None:
        cfg, st, world = self.config, self.state, self.context.world_size
        if self.is_master:
            self.log = TrainingLog(self.dump_path, st, self.wandb)
            logger.info(
                "Training: %d sequences, %d batches/epoch/process, effective batch %d x %d x %d = %d sequences, "
                "%d optimizer steps",
                len(self.dataset),
                self.batches_per_epoch,
                cfg.batch_size,
                self.accum,
                world,
                cfg.batch_size * self.accum * world,
                self.num_steps_total,
            )
            if st.n_total_iter == 0:
                description = self.run_description or {"config": vars(cfg), "context": self.context.describe()}
                self.log.configs(description, self.student)
        self.student.train()
        self._start_time, self._start_tokens = time.time(), st.n_tokens
        self.stop.install()
        try:
            return self._train_loop()
        except RuntimeError as e:
            if self.distributed and rank_faults.is_collective_failure(e):
                self.stop.ignore_sigterm_after()  # a rank is gone and nothing can be saved
            raise
        finally:
            self.stop.restore()
            if self.log is not None:
                self.log.close()
            self.window.log_skip_summary(self.state)

    def _train_loop(self) -> str | None:
        cfg, st = self.config, self.state
        while st.epoch < cfg.n_epoch and not self._reached_max_steps():
            batches = self._epoch_batches(st.epoch, st.batch_in_epoch)
            bar = tqdm(
                batches,
                desc=f"epoch {st.epoch}",
                initial=st.batch_in_epoch,
                total=self.batches_per_epoch,
                disable=not self.is_master,
                dynamic_ncols=True,
            )
            for batch in bar:
                self._train_micro_batch(batch)
                if self.is_master:
                    bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in st.last_loss.items()})
                if self.stop.reason or self._reached_max_steps():
                    break
            bar.close()
            if self._reached_max_steps():
                break
            if self.stop.reason:
                self.window.settle(self.state)
                checkpointing.save_state(self.state_dict(), self.context, self.config.save_total_limit)
                if self.is_master:
                    logger.warning(
                        "Stopped by %s after micro-batch %d; the state is saved: continue with --resume.",
                        self.stop.reason,
                        st.n_total_iter,
                    )
                return self.stop.reason
            self._end_epoch()
        # Gradients left from a partial accumulation (max_steps reached mid-way) are dropped.
        self.optimizer.zero_grad(set_to_none=True)
        weights = sharding.full_model_state(self.student)  # every rank: a gather under --fsdp
        if self.is_master:
            self.save_final(weights)
        return None

    def _train_micro_batch(self, batch) -> None:
        cfg, st = self.config, self.state
        # The last micro-batch of a window, or of the epoch, all-reduces and steps.
        sync = self.window.ends_at(st)
        if cfg.include_crossway:
            # Second sub-step with roles swapped: (dual, base), on the first one's corrupted inputs and
            # mirrored positions (fast mode draws its own). Both add to the same gradients.
            plan = self._plan(batch)
            metrics, bad = self._forward_backward(plan, sync=False)
            reuse = plan.mode is not Mode.PLAIN and not cfg.fast_mode
            mirrored = self._mirrored_plan(plan) if reuse else crossway_batch(*batch)
            back, bad_back = self._forward_backward(mirrored, sync=sync)
            metrics = {k: (metrics[k] + back[k]) / 2 for k in metrics}
            bad = bad | bad_back
            st.n_tokens += int(batch[3].sum()) * self.context.world_size
        else:
            metrics, bad = self._forward_backward(batch, sync=sync)
        st.n_tokens += int(batch[1].sum()) * self.context.world_size  # host lengths: no device wait
        st.batch_in_epoch += 1
        st.n_total_iter += 1
        self.window.add(st.n_total_iter, bad, metrics)
        self.stop.agree()
        log_now = st.n_total_iter % cfg.log_interval == 0
        if log_now:
            self.window.settle(self.state)  # on every rank: it may all-reduce
        if log_now and self.is_master and not cfg.fsdp:  # sharded: rank 0 alone cannot read the weights
            self.log.parameters(self.student, st.n_total_iter)  # before the step zeroes the gradients
        grad_norm = self.window.step(st) if sync else None
        if log_now and self.is_master:
            lr = self.scheduler.get_last_lr()[0]
            self.log.step(self.window.last_metrics, st, lr, grad_norm, self.num_steps_total)
        if st.n_total_iter % cfg.checkpoint_interval == 0:
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        """The training state (every rank), checkpoint.pth and a checkpoint-<step>/ model folder (rank 0)."""
        self.window.settle(self.state)  # a window that saw a non-finite loss stops here, not in a saved state
        state = self.state_dict()
        checkpointing.save_state(state, self.context, self.config.save_total_limit)
        if self.is_master:
            self._save_student("checkpoint.pth", state["student"])
            student_files.save_model_folder(
                self.student,
                self.tokenizer,
                self.dump_path,
                self.state.n_total_iter,
                self.config.save_total_limit,
                weights=state["student"],
            )

    def _reached_max_steps(self) -> bool:
        return self.config.max_steps > 0 and self.state.n_optim_steps >= self.config.max_steps

    def _end_epoch(self) -> None:
        st = self.state
        weights = sharding.full_model_state(self.student)  # every rank: a gather under --fsdp
        if self.is_master:
            self._save_student(f"model_epoch_{st.epoch}.pth", weights)
            self.log.epoch(st.epoch, st.epoch_loss_sum / max(st.epoch_loss_count, 1))
        logger.info("Epoch %d done", st.epoch)
        st.epoch += 1
        st.batch_in_epoch = 0
        st.epoch_loss_sum, st.epoch_loss_count = 0.0, 0

    # --- the student's files ------------------------------------------------------------------

    def _save_student(self, name: str, weights: dict[str, torch.Tensor]) -> None:
        student_files.save_weights(weights, self.dump_path / name)

    def train_results(self) -> dict[str, float | int]:
        """The end-of-run summary written to train_results.json (runtime and speed: this process's run)."""
        st = self.state
        runtime = time.time() - self._start_time
        return {
            "epoch": st.epoch,
            "optimizer_steps": st.n_optim_steps,
            "micro_batches": st.n_total_iter,
            "skipped_steps": st.n_skipped_steps,
            "train_tokens": st.n_tokens,
            "train_runtime": round(runtime, 3),
            "train_tokens_per_second": round((st.n_tokens - self._start_tokens) / max(runtime, 1e-9), 3),
            **{f"train_{k}": v for k, v in st.last_loss.items()},
        }

    def save_final(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        """`pytorch_model.bin` (state dict, original name), a `from_pretrained` folder, then train_results.json.

        weights: the student's full state dict (`sharding.full_model_state`); default its `state_dict()`.
        The summary comes last, and a resumed run's old one goes first: a save cut short never leaves a
        train_results.json beside a model it does not describe.
        """
        summary = self.dump_path / "train_results.json"
        summary.unlink(missing_ok=True)
        student_files.save_final(
            self.student, self.dump_path, self.student.state_dict() if weights is None else weights
        )
        write_json(self.train_results(), summary)
        if self.log is not None:
            self.log.flush()
        logger.info("Saved the student in %s", self.dump_path)
