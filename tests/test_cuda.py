"""What only a CUDA machine can check: mixed-precision training steps, CUDA = CPU in float32, NCCL.

Skipped without CUDA (the CI has none). `python benchmarks/gpu_check.py` runs this file on a GPU
machine among its checks. Nothing here needs the real data or the offline tokenizer package: the
models, tokenizer and corpus are built by `gpu_check_workspace.build_workspace` (the GPU machine has neither).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO
from conftest import load_state as load  # a run's own state file (it holds numpy RNG states)

import causal_train
import losses as L
from interventions import get_activation_at, interchange_with_activation_at
from neuron_mapping import deserialize_variable_name

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_check_workspace  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SIZES = gpu_check_workspace.Sizes(
    teacher_layers=4,
    teacher_hidden=64,
    teacher_heads=4,
    student_layers=2,
    batch_size=8,
    seq_len=32,
    train_steps=4,
    bench_shapes=(),
    bench_reps=1,
    timeout_s=0,
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> gpu_check_workspace.Workspace:
    return gpu_check_workspace.build_workspace(tmp_path_factory.mktemp("cuda_ws"), SIZES, data="synthetic")


def _train_on_cuda(ws: gpu_check_workspace.Workspace, name: str, *flags: str):
    """causal_train.main on cuda:0; returns (run folder, peak CUDA bytes allocated)."""
    torch.cuda.init()
    torch.cuda.reset_peak_memory_stats()
    argv = gpu_check_workspace.train_argv(ws, SIZES, "cuda", name, "--checkpoint_interval", "4", *flags)
    run = causal_train.main(argv)
    return run, torch.cuda.max_memory_allocated()


def _assert_trained(ws: gpu_check_workspace.Workspace, run, peak: int) -> None:
    assert peak > 0  # the models and the step lived on the GPU
    loss = gpu_check._scalars(run, "losses/loss")
    assert len(loss) == SIZES.train_steps and all(math.isfinite(v) for v in loss), loss
    final = torch.load(run / "pytorch_model.bin", weights_only=True)
    initial = torch.load(ws.student_weights, weights_only=True)
    assert all(torch.isfinite(v).all() for v in final.values())
    changed = [k for k, v in initial.items() if not torch.equal(final[k], v)]
    assert "distilbert.transformer.layer.0.attention.q_lin.weight" in changed, changed


def test_bf16_autocast_training_steps_on_cuda_are_finite_and_change_the_weights(workspace):
    run, peak = _train_on_cuda(workspace, "bf16", "--bf16")
    _assert_trained(workspace, run, peak)
    state = load(run / "checkpoints" / "state_0000000004_rank0.pth")
    assert not state["scaler"]  # bf16 needs no loss scaling


def test_fp16_gradscaler_training_steps_on_cuda_are_finite_and_change_the_weights(workspace):
    run, peak = _train_on_cuda(workspace, "fp16", "--fp16", "--teacher_fp16")
    _assert_trained(workspace, run, peak)
    scaler = load(run / "checkpoints" / "state_0000000004_rank0.pth")["scaler"]
    assert scaler and math.isfinite(scaler["scale"]) and scaler["scale"] > 0, scaler


def _diito_loss_and_grads(device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One DIITO counterfactual loss (causal ce + cos + mlm) with fixed inputs and positions, in float32.

    The teacher's and the student's source runs on the dual, their counterfactual runs on the base
    with the source values written in, the losses of losses.py; returns the loss and the student's
    gradients, on CPU.
    """
    import transformers as tr

    torch.manual_seed(0)
    teacher = (
        tr.BertForMaskedLM(
            tr.BertConfig(
                vocab_size=150,
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
            )
        )
        .eval()
        .to(device)
    )
    student = tr.DistilBertForMaskedLM(
        tr.DistilBertConfig(
            vocab_size=150,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
        )
    ).to(device)
    g = torch.Generator().manual_seed(1)
    base, dual = torch.randint(104, 150, (4, 12), generator=g), torch.randint(104, 150, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    positions = torch.zeros(4, 12, dtype=torch.bool)
    positions[:, 3:7] = True
    labels = torch.full((4, 12), -100)
    labels[:, 2] = base[:, 2]
    base, dual, mask, positions, labels = (t.to(device) for t in (base, dual, mask, positions, labels))
    t_names = deserialize_variable_name("$L:2$H:[0:4]$[0:8]")  # block 2 <-> block 1, all heads
    s_names = deserialize_variable_name("$L:1$H:[0:4]$[0:8]")
    with torch.no_grad():
        t_source = get_activation_at(teacher, dual, mask, t_names)
        t_cf = interchange_with_activation_at(teacher, base, mask, t_source, t_names, positions, positions)
    s_source = get_activation_at(student, dual, mask, s_names)
    s_cf = interchange_with_activation_at(student, base, mask, s_source, s_names, positions, positions)
    real = mask.bool()
    loss = (
        L.ce_loss(s_cf.logits[real], t_cf.logits[real], 2.0)
        + L.cos_loss(s_cf.last_hidden_state[real], t_cf.last_hidden_state[real])
        + L.mlm_loss(s_cf.logits.view(-1, 150), labels.view(-1))
    )
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.cpu() for n, p in student.named_parameters() if p.grad is not None}


def test_diito_counterfactual_loss_and_gradients_on_cuda_equal_cpu_in_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # true float32 matmuls on Ampere+
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cpu_loss, cpu_grads = _diito_loss_and_grads("cpu")
    cuda_loss, cuda_grads = _diito_loss_and_grads("cuda")
    torch.testing.assert_close(cuda_loss, cpu_loss, rtol=1e-5, atol=1e-6)
    assert cuda_grads.keys() == cpu_grads.keys() and len(cpu_grads) > 10
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(cuda_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


DDP_SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist, transformers as tr
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("nccl")
    torch.cuda.set_device(0)
    config = tr.DistilBertConfig(vocab_size=150, dim=32, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0,
                                 attention_dropout=0.0)
    torch.manual_seed(0)
    plain = tr.DistilBertForMaskedLM(config).cuda()
    wrapped = DDP(tr.DistilBertForMaskedLM(config).cuda(), device_ids=[0])
    wrapped.module.load_state_dict(plain.state_dict())
    ids = torch.randint(5, 150, (4, 16), device="cuda")
    for model in (plain, wrapped):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    flag = torch.ones(1, device="cuda")
    dist.all_reduce(flag)
    assert flag.item() == dist.get_world_size() == 1
    print("NCCL_DDP_OK", ".".join(map(str, torch.cuda.nccl.version())))
    dist.destroy_process_group()
""")


def test_torchrun_one_process_over_nccl_gives_ddp_the_plain_gradients(tmp_path):
    script = tmp_path / "ddp_nccl.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "NCCL_DDP_OK" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
