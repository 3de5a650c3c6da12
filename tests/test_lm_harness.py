"""EleutherAI's lm-evaluation-harness (the installed `lm_eval` package) on what causal_train.py writes: a
distilled Llama student's run folder and its checkpoint-<step>/ folder, scored offline on a local
multiple-choice task (a YAML task over a JSONL file). The reported acc and acc_norm equal the argmax of
the student's summed choice log-probabilities computed here from the word ids, without the harness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, save_tiny_decoder_teacher, tiny_decoder_config

import causal_train
from token_store import save_sequences

VOCAB = 60  # the word-level test tokenizer: "w<i>" is id i, <s> is 1, </s> is 2
BOS, EOS = 1, 2
TASK = "tiny_words"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-block Llama student distilled (ce + clm + causal_ce) for 3 steps from a random 2-block teacher;
    checkpoint-2/ is the model after step 2, the run folder the model after step 3."""
    root = tmp_path_factory.mktemp("harness_run")
    teacher = save_tiny_decoder_teacher("llama", root / "teacher", vocab=VOCAB, layers=2)
    tiny_decoder_config("llama", vocab=VOCAB, layers=2).to_json_file(root / "student.json")
    rng = np.random.default_rng(0)
    corpus = [np.array([BOS, *rng.integers(4, VOCAB, rng.integers(8, 20)), EOS]) for _ in range(16)]
    save_sequences(corpus, root / "corpus.pickle")
    block_1 = ["$L:1$H:[0:4]$[0:8]"]  # teacher block 1 <-> student block 1, the whole output
    pair = {"teacher_variable_names": block_1, "student_variable_names": block_1}
    mapping = {"interchange_variable_mappings": [pair]}
    (root / "m.nm").write_text(json.dumps(mapping))
    flags = dict(
        n_gpu=0,
        checkpoint_interval=2,
        student_type="llama",
        student_config=root / "student.json",
        teacher_type="llama",
        teacher_name=teacher,
        neuron_mapping=root / "m.nm",
        alpha_ce=0.5,
        alpha_clm=0.5,
        alpha_causal_ce=0.5,
        interchange_prop=0.3,
        dump_path=root / "results",
        run_name="run",
        data_file=root / "corpus.pickle",
        seed=0,
        batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=3,
    )
    return causal_train.main(["--force", *(s for k, v in flags.items() for s in (f"--{k}", str(v)))])


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """tiny_words.yaml over docs.jsonl: 8 contexts of 5 words, 4 choices of 2 words each, a fixed label."""
    folder = tmp_path_factory.mktemp("harness_task")
    rng = np.random.default_rng(1)
    docs = [
        {
            "context": words(rng.integers(4, VOCAB, 5)),
            "choices": [words(rng.integers(4, VOCAB, 2)) for _ in range(4)],
            "label": int(rng.integers(4)),
        }
        for _ in range(8)
    ]
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    # The docs.md recipe, plus a datasets cache of its own (the in-process run would use the user's).
    (folder / f"{TASK}.yaml").write_text(
        f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "docs.jsonl"}
  cache_dir: {folder / "datasets_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    )
    return folder


def docs(task_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (task_dir / "docs.jsonl").read_text().splitlines()]


@torch.no_grad()
def direct_scores(model_dir: Path, docs: list[dict], bos: bool) -> tuple[list[list[float]], float, float]:
    """Per document, the summed log-probability (nats) of each choice's word ids after the context's
    (after <s> too with `bos`), from one stock forward pass; acc and acc_norm (the log-probability per
    character of the choice) of their argmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lls, hits, hits_norm = [], 0, 0
    for doc in docs:
        context = [BOS] * bos + [int(w[1:]) for w in doc["context"].split()]
        row = []
        for choice in doc["choices"]:
            continuation = [int(w[1:]) for w in choice.split()]
            ids = torch.tensor([context + continuation])
            log_p = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # position t predicts t + 1
            targets = ids[0, len(context) :]
            row.append(float(log_p[len(context) - 1 :].gather(1, targets[:, None]).sum()))
        top_two = sorted(row)[-2:]
        assert top_two[1] - top_two[0] > 1e-3, "the test's documents must have a clear argmax"
        lls.append(row)
        hits += int(np.argmax(row)) == doc["label"]
        hits_norm += int(np.argmax(np.array(row) / [len(c) for c in doc["choices"]])) == doc["label"]
    return lls, hits / len(docs), hits_norm / len(docs)


def harness_lls(samples: list[dict]) -> list[list[float]]:
    """Each logged sample's per-choice log-likelihoods, in document order."""
    return [[float(ll) for ll, _ in s["filtered_resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


def test_nothing_in_the_tree_shadows_the_harness_package():
    import lm_eval

    assert not (REPO / "lm_eval.py").exists() and not (REPO / "lm_eval").exists()
    assert REPO not in Path(lm_eval.__file__).resolve().parents


def test_cli_scores_a_run_folder_as_the_student_computes(run_dir, task_dir, tmp_path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repo is not on sys.path
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    # docs/evaluation.md's command (`lm_eval` is the console script of `python -m lm_eval`), run outside the repo.
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={run_dir},dtype=float32"]
    command += ["--tasks", TASK, "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1"]
    command += ["--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    (results_file,) = out.glob("*/results_*.json")
    (samples_file,) = out.glob(f"*/samples_{TASK}_*.jsonl")
    reported = json.loads(results_file.read_text())["results"][TASK]
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    lls, acc, acc_norm = direct_scores(run_dir, docs(task_dir), bos=False)
    assert harness_lls(samples) == [pytest.approx(row, abs=1e-4) for row in lls]
    assert reported["acc,none"] == acc
    assert reported["acc_norm,none"] == acc_norm


def test_simple_evaluate_scores_a_checkpoint_folder_with_the_start_token(run_dir, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    checkpoint = run_dir / "checkpoint-2"
    results = simple_evaluate(
        model="hf",
        model_args=dict(pretrained=str(checkpoint), dtype="float32", add_bos_token=True),
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),  # no index of the built-in tasks
        device="cpu",
        batch_size=1,
        bootstrap_iters=0,
        # leave the session's random generators alone
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
    )
    lls, acc, acc_norm = direct_scores(checkpoint, docs(task_dir), bos=True)
    assert harness_lls(results["samples"][TASK]) == [pytest.approx(row, abs=1e-4) for row in lls]
    assert results["results"][TASK]["acc,none"] == acc
    assert results["results"][TASK]["acc_norm,none"] == acc_norm
    final, _, _ = direct_scores(run_dir, docs(task_dir), bos=True)
    assert final != [pytest.approx(row, abs=1e-4) for row in lls]  # the checkpoint's weights, not the final ones
