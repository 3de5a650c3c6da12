"""benchmarks/gpu_check.py without a GPU: the plan, the parsers on recorded output, the table, and a
CPU run of everything that does not need CUDA (tiny sizes)."""

from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import REPO

from utils import UserError, run_cli

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_check_report  # noqa: E402

# Recorded from a CPU run of `bench_step.py ... --fast --train_steps 3` (step table, then the end-to-end one).
BENCH_OUTPUT = """\
teacher 4x32 (4 heads) -> student 2 layers, vocab 30522, batch 2x16, mapped blocks 2 -> 1; cpu, 2 threads, \
1 steps per variant; matmul peak 24 GFLOP/s
| step | s/step | tokens/s | x plain | CPU s/step | x plain (CPU s) | FLOPs x plain | GFLOP/step | MFU |
|---|---|---|---|---|---|---|---|---|
| plain | 2.749 | 1,212 | 1.00x | 0.77 | 1.00x | 1.00x | 0 | 0% |
| diito | 1.953 | 16 | 0.71x | 0.55 | 0.71x | 2.02x | 1 | 1% |
| fast | 2.207 | 14 | 0.80x | 0.61 | 0.79x | 1.97x | 1 | 1% |
| original | 5.630 | 6 | 2.05x | 1.57 | 2.03x | 2.52x | 1 | 81% |

end to end: causal_train.main, 3 optimizer steps of one 2x16 micro-batch each, median over steps 2..3
| run | s/step | tokens/s | x plain | step benchmark x plain |
|---|---|---|---|---|
| plain | 0.100 | 320 | 1.00x | 1.00x |
GPU_CHECK_RESULT {"peak_gib": 1.5, "problems": []}
"""


def test_dry_run_lists_every_check_with_its_command(capsys, tmp_path):
    results = gpu_check.main(["--dry_run", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    names = [
        "cuda_tests",
        "train_fp32",
        "train_fp16",
        "train_bf16",
        "torchrun",
        "bench_step_32x128",
        "bench_step_16x512",
    ]
    assert [r.name for r in results] == names and {r.status for r in results} == {"planned"}
    for name in names:
        assert f"- {name}: " in out
    lines = out.splitlines()
    command = {name: lines[i + 1] for i, line in enumerate(lines) for name in names if line.startswith(f"- {name}:")}
    assert "pytest" in command["cuda_tests"] and "tests/test_cuda.py" in command["cuda_tests"]
    assert command["train_fp32"].startswith("    $ python causal_train.py ") and "--n_gpu 1" in command["train_fp32"]
    assert "--fp16 --teacher_fp16" in command["train_fp16"] and command["train_bf16"].endswith("--bf16")
    assert command["torchrun"].startswith("    $ torchrun --standalone --nproc_per_node 1 causal_train.py ")
    assert "nccl" in out and "--max_steps 60" in command["train_fp32"]
    assert "--batch_size 16 --seq_len 512" in command["bench_step_16x512"]
    assert "--device cuda" in command["bench_step_16x512"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing

    quick = gpu_check.main(["--dry_run", "--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    assert [r.name for r in quick] == [
        "cuda_tests",
        "train_fp32",
        "train_fp16",
        "train_bf16",
        "torchrun",
        "bench_step_2x16",
    ]
    assert quick[0].status == "skip" and "gloo" in out and "--n_gpu 0" in out and "--fp16 --teacher_fp16" in out


def test_without_cuda_the_cli_says_so_in_one_line_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--quick"])
    with pytest.raises(SystemExit) as e:
        run_cli(gpu_check.cli)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: no CUDA device") and "--dry_run" in err[0]
    with pytest.raises(UserError, match="--only: unknown check"):
        gpu_check.main(["--dry_run", "--only", "train_fp8"])


def test_bench_table_and_peak_are_parsed_from_bench_step_output():
    table = gpu_check_report.parse_bench_table(BENCH_OUTPUT)
    assert list(table) == ["plain", "diito", "fast", "original"]  # the end-to-end table is not mixed in
    assert table["plain"] == dict(seconds=2.749, tokens_per_s=1212.0, x_plain=1.0, mfu=0.0)
    assert table["diito"]["x_plain"] == 0.71 and table["original"]["mfu"] == pytest.approx(0.81)
    assert gpu_check_report.parse_bench_peak(BENCH_OUTPUT) == 24.0
    assert gpu_check_report.parse_bench_table("no table here") == {}


def test_pytest_summary_and_child_result_lines_are_parsed():
    parse = gpu_check_report.parse_pytest_summary
    assert parse("....s\n4 passed, 1 skipped, 2 warnings in 10.52s\n") == dict(passed=4, skipped=1)
    assert parse("===== 1 failed, 3 passed in 3.20s =====") == dict(failed=1, passed=3)
    assert parse("ERROR tests/x.py\n!!!\n========= 2 errors in 1.01s =========") == dict(errors=2)
    assert parse("no summary") == {}
    # torchrun may prefix a worker's lines; the last result line wins; a broken one is ignored.
    text = 'GPU_CHECK_RESULT {"a": 1}\n[default0]:GPU_CHECK_RESULT {"a": 2}\nGPU_CHECK_RESULT {"a": \n'
    assert gpu_check_report.parse_result_line(text) == {"a": 2}
    assert gpu_check_report.parse_result_line("nothing") is None


def test_results_are_judged_from_exit_status_output_and_the_child_report():
    result_of = gpu_check_report.result_of
    bench = result_of("bench_step_2x16", 0, BENCH_OUTPUT, 12.0, 60)
    assert (bench.status, bench.tokens_per_s, bench.mfu, bench.peak_gib) == ("pass", 16.0, 0.01, 1.5)
    assert "diito 0.71x (1%)" in bench.notes and "matmul peak 24 GFLOP/s" in bench.notes
    child = {
        "peak_gib": 2.0,
        "problems": [],
        "notes": ["largest weight change 5.0e-04"],
        "losses": [2.85, 2.5],
        "tokens_per_s": 1000.0,
    }
    train = result_of("train_bf16", 0, "log\nGPU_CHECK_RESULT " + json.dumps(child), 30.0, 60)
    assert (train.status, train.loss, train.tokens_per_s) == ("pass", "2.850 -> 2.500", 1000.0)
    child["problems"] = ["non-finite loss: [nan]"]
    bad = result_of("train_fp16", 0, "GPU_CHECK_RESULT " + json.dumps(child), 30.0, 60)
    assert bad.status == "fail" and bad.notes.startswith("non-finite loss")
    crashed = result_of("train_fp32", 2, "INFO starting\nerror: --data_file x: no such file\n", 3.0, 60)
    assert crashed.status == "fail" and crashed.notes == "error: --data_file x: no such file"
    assert result_of("torchrun", None, "", 60.0, 60).notes == "timed out after 60 s"
    tests = result_of("cuda_tests", 0, "3 passed, 1 skipped in 9.1s", 10.0, 60)
    assert tests.status == "pass" and tests.notes == "3 passed, 1 skipped"
    all_skipped = result_of("cuda_tests", 0, "sssss\n5 skipped in 1.0s", 2.0, 60)
    assert all_skipped.status == "fail" and "all skipped" in all_skipped.notes


def test_table_has_one_row_per_check_with_every_column():
    results = [
        gpu_check_report.Result("train_bf16", "pass", 31.4, 12345.6, None, 3.21, "2.850 -> 2.500", "a | b"),
        gpu_check_report.Result("bench_step_32x128", "fail", 5.0, 800.0, 0.456, None, "", ""),
    ]
    table = gpu_check_report.format_table(results, {"gpu": "NVIDIA H200", "torch": "2.11"})
    lines = table.splitlines()
    assert lines[0] == "gpu NVIDIA H200, torch 2.11"
    rows = [line for line in lines if line.startswith("| ")]
    assert rows[0] == "| check | status | s | tokens/s | MFU | peak GiB | loss | notes |"
    assert rows[1] == "| train_bf16 | pass | 31 | 12,346 |  | 3.21 | 2.850 -> 2.500 | a / b |"
    assert rows[2] == "| bench_step_32x128 | fail | 5 | 800 | 46% |  |  |  |"
    assert all(row.count("|") == 9 for row in rows)


def test_a_check_past_its_timeout_is_killed_and_reported(tmp_path):
    check = gpu_check.Check(
        "train_fp32", "", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    )
    with open(tmp_path / "log.txt", "w") as log:
        rc, out, seconds = gpu_check.run_check(check, 1, log)
    assert rc is None and "started" in out and seconds < 30
    assert "===== train_fp32" in (tmp_path / "log.txt").read_text()


def test_cpu_mode_runs_training_torchrun_and_bench_step_end_to_end(tmp_path, capsys, monkeypatch):
    # One check made to fail: the others still run, and the table reports it.
    plan = gpu_check.plan

    def with_a_failing_check(*args, **kwargs):
        checks = plan(*args, **kwargs)
        checks[1].command = [sys.executable, "-c", "import sys; print('error: boom'); sys.exit(2)"]
        return checks

    monkeypatch.setattr(gpu_check, "plan", with_a_failing_check)
    out = tmp_path / "out"
    results = gpu_check.main(
        [
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(out),
            "--only",
            "train_fp32",
            "train_bf16",
            "torchrun",
            "bench_step_2x16",
        ]
    )
    by_name = {r.name: r for r in results}
    assert list(by_name) == ["train_fp32", "train_bf16", "torchrun", "bench_step_2x16"]
    assert (by_name["train_fp32"].status, by_name["train_fp32"].notes) == ("fail", "error: boom")
    for name in ("train_bf16", "torchrun", "bench_step_2x16"):
        assert by_name[name].status == "pass", (name, by_name[name].notes, (out / "log.txt").read_text()[-3000:])
        assert by_name[name].tokens_per_s > 0 and by_name[name].peak_gib > 0
    for name in ("train_bf16", "torchrun"):
        first, last = map(float, by_name[name].loss.split(" -> "))
        assert math.isfinite(first) and math.isfinite(last)
        assert "largest weight change" in by_name[name].notes
    assert "training process group: none (world size 1)" in by_name["torchrun"].notes
    assert "gloo: all_reduce and DDP gradients ok (world size 1)" in by_name["torchrun"].notes
    assert by_name["bench_step_2x16"].mfu is not None and "diito" in by_name["bench_step_2x16"].notes
    printed = capsys.readouterr().out
    assert printed.strip() == (out / "table.md").read_text().strip()
    assert "| train_bf16 | pass |" in printed and "| train_fp32 | fail |" in printed
    saved = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in saved["results"]] == list(by_name) and saved["environment"]["torch"]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "table.md"]
