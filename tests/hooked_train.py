"""`python causal_train.py ARGS` with test hooks: ``python tests/hooked_train.py ARGS``.

The tests that signal or kill a run start it through this script. Hooks are chosen by environment
variables and wrap functions of the training modules for the run's lifetime; nothing in the
training code knows about tests.

- TEST_RECORD=DIR: per rank, append to DIR/rank{r}.jsonl the dual pairing and torch seed at the
  start of training, every loaded batch (with its epoch) and every step's drawn variables; save
  the final student as DIR/student_rank{r}.pt.
- TEST_PAUSE_AFTER=N, TEST_MARKER=PATH (TEST_PAUSE_RANK=R: only rank R): after micro-batch N,
  write the process id into PATH and wait (up to 60 s) until a stop signal arrived.
- TEST_HANG_IN_SAVE=N, TEST_MARKER=PATH: the N-th state write stops halfway, touches PATH and hangs.
- TEST_WEIGHTLESS_RANK=R: on rank R, reading a model's weights (`from_pretrained`, the student's
  `--student_pretrained_weights`), or a model with weights reaching `sharding.shard`, fails the run.
"""

from __future__ import annotations

import io
import json
import os
import runpy
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402

import causal_distiller  # noqa: E402
import checkpointing  # noqa: E402
import model_loading  # noqa: E402
import sharding  # noqa: E402
from neuron_mapping import sample_interchange_variables  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def record_hooks(out: Path) -> list:
    log = open(out / f"rank{RANK}.jsonl", "a")

    def record(**kw) -> None:
        log.write(json.dumps(kw) + "\n")
        log.flush()

    iter_batches, sample, train = (
        checkpointing.SkipBatches.__iter__,
        sample_interchange_variables,
        causal_distiller.CausalDistiller.train,
    )

    def recording_iter(self):
        for batch in iter_batches(self):
            record(epoch=self.batch_sampler.sampler.epoch, batch=batch)
            yield batch

    def recording_sample(mapping, rng):
        variables = sample(mapping, rng)
        record(variables=variables)
        return variables

    def recording_train(self):
        record(dual_index=self.dataset.dual_index.tolist(), torch_seed=torch.initial_seed())
        try:
            return train(self)
        finally:
            torch.save(self.student.state_dict(), out / f"student_rank{RANK}.pt")

    return [
        mock.patch.object(checkpointing.SkipBatches, "__iter__", recording_iter),
        mock.patch.object(causal_distiller, "sample_interchange_variables", recording_sample),
        mock.patch.object(causal_distiller.CausalDistiller, "train", recording_train),
    ]


def pause_hook(after: int, marker: str, rank: int) -> list:
    step = causal_distiller.CausalDistiller._train_micro_batch

    def pausing_step(self, batch):
        step(self, batch)
        if self.state.n_total_iter == after and rank == RANK:
            Path(marker + ".tmp").write_text(str(os.getpid()))
            os.replace(marker + ".tmp", marker)
            deadline = time.time() + 60
            while self.stop.requested is None and time.time() < deadline:
                time.sleep(0.01)

    return [mock.patch.object(causal_distiller.CausalDistiller, "_train_micro_batch", pausing_step)]


def hang_in_save_hook(nth: int, marker: str) -> list:
    save, state_writes = torch.save, []

    def hanging_save(obj, f, *args, **kwargs):
        if "/.state_" in str(getattr(f, "name", f)):
            state_writes.append(f)
            if len(state_writes) == nth:
                buf = io.BytesIO()
                save(obj, buf, *args, **kwargs)
                f.write(buf.getvalue()[: buf.tell() // 2])
                f.flush()
                Path(marker).touch()
                time.sleep(600)
        return save(obj, f, *args, **kwargs)

    return [mock.patch.object(torch, "save", hanging_save)]


def weightless_hook(rank: int) -> list:
    if rank != RANK:
        return []

    def refuse(*args, **kwargs):
        raise AssertionError(f"rank {RANK} read model weights")

    shard = sharding.shard

    def shard_empty(runs, **kwargs):
        if not all(p.device.type == "meta" for p in runs.model.parameters()):
            raise AssertionError(f"rank {RANK} built a model with weights")
        return shard(runs, **kwargs)

    return [
        mock.patch.object(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse)),
        mock.patch.object(model_loading, "load_student_weights", refuse),
        mock.patch.object(sharding, "shard", shard_empty),
    ]


def main() -> None:
    env = os.environ.get
    hooks = []
    if env("TEST_RECORD"):
        hooks += record_hooks(Path(env("TEST_RECORD")))
    if env("TEST_PAUSE_AFTER"):
        hooks += pause_hook(int(env("TEST_PAUSE_AFTER")), env("TEST_MARKER"), int(env("TEST_PAUSE_RANK", RANK)))
    if env("TEST_HANG_IN_SAVE"):
        hooks += hang_in_save_hook(int(env("TEST_HANG_IN_SAVE")), env("TEST_MARKER"))
    if env("TEST_WEIGHTLESS_RANK"):
        hooks += weightless_hook(int(env("TEST_WEIGHTLESS_RANK")))
    with ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(hook)
        sys.argv = [str(REPO / "causal_train.py"), *sys.argv[1:]]
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
