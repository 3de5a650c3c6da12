"""Loading the teacher and the student for `causal_train.py`, and the checks that refuse bad inputs.

Every check raises `utils.UserError` naming the flag or file: a student config that would not
build the `--student_type` model it claims, a local teacher folder without a config or tokenizer,
a teacher whose LM head was never trained, student weights that are not a state dict of tensors.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoTokenizer

from architectures import ARCHITECTURES, max_positions
from model_files import check_model_folder, check_tokenizer_fits, weights_file, weights_problem
from training_config import RunOptions, TrainingConfig
from utils import UserError, first_line, one_line, require_no_symlink_loop

logger = logging.getLogger("causal_train")  # the training CLI's log lines, whichever module writes them


# Size settings every family names (through its config's attribute_map: DistilBERT's `dim`, GPT-2's
# `n_embd`...), plus the families' own names for the feed-forward width.
SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "max_position_embeddings",
    "intermediate_size",
    "num_key_value_heads",
    "head_dim",
    "hidden_dim",
    "n_inner",
)
# Sizes a config may leave null: the model derives them (GPT-2's 4 * n_embd, Llama's hidden / heads).
DERIVED_SIZES = ("n_inner", "head_dim", "num_key_value_heads")
# Keys a saved config carries that are no setting (written by save_pretrained, or by the original's configs).
BOOKKEEPING_KEYS = ("transformers_version", "architectures", "_name_or_path", "tie_weights_")


def check_student_config(path: str, student_type: str):
    """The student's `transformers` config from its file; UserError (naming the file and the key) unless
    it makes a `student_type` model: a JSON object whose model_type (if any) is the student type,
    every known setting of its default's type, sizes positive and consistent, no other family's setting."""
    try:
        raw = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise UserError(f"student config {path} is not JSON text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"student config {path} is not JSON: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read student config {path}: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise UserError(f"student config {path} must be a JSON object of settings, not a {type(raw).__name__}")
    model_type = raw.get("model_type", student_type)
    if model_type != student_type:
        raise UserError(f"student config {path} has model_type {model_type!r}, but --student_type is {student_type}")
    config_class = ARCHITECTURES[student_type].config_cls()
    default = config_class()
    known = default.to_dict()
    aliases = dict(getattr(config_class, "attribute_map", {}) or {})
    settings = {aliases.get(k, k): v for k, v in raw.items()}
    for key, value in settings.items():
        expected = type(known.get(key))
        ok = {
            int: type(value) is int,
            bool: type(value) is bool,
            float: isinstance(value, (int, float)) and type(value) is not bool,
        }.get(expected, True)
        if value is not None and not ok:
            raise UserError(f"student config {path}: {key!r} must be {expected.__name__}, got {value!r}")
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, (int, float)) and not 0 <= value <= 1:
            raise UserError(f"student config {path}: {key!r} must be in [0, 1], got {value!r}")
    try:
        config = config_class.from_dict(raw)
    except (TypeError, ValueError, KeyError, StrictDataclassError) as e:  # transformers' own validation
        raise UserError(f"student config {path}: {one_line(e)}") from None
    sizes = [aliases.get(k, k) for k in SIZE_KEYS if aliases.get(k, k) in known]
    for key in sizes:
        value = getattr(config, key)
        if value is None and key in DERIVED_SIZES:
            continue
        if type(value) is not int or value < 1:
            raise UserError(f"student config {path}: {key!r} must be a positive integer, got {value!r}")
    hidden, heads = (aliases.get(k, k) for k in ("hidden_size", "num_attention_heads"))
    h, n = getattr(config, hidden), getattr(config, heads)
    head_dim = getattr(config, "head_dim", None)
    if h % n and head_dim in (None, h // n):  # a head width derived from the hidden size must divide it
        raise UserError(f"student config {path}: {hidden!r} {h} is not divisible by {heads!r} {n}")
    kv = getattr(config, "num_key_value_heads", None)
    if kv is not None and n % kv:
        raise UserError(f"student config {path}: {heads!r} {n} is not divisible by 'num_key_value_heads' {kv}")
    others = {k for row in ARCHITECTURES.values() if row.name != student_type for k in _config_keys(row)}
    # A key the config neither knows nor converts (a legacy name such as Llama's rope_theta) stays a
    # plain attribute that no model reads.
    kept = config.to_dict()
    unknown = [
        k
        for k in raw
        if aliases.get(k, k) not in known and k not in aliases and k in kept and k not in BOOKKEEPING_KEYS
    ]
    foreign = [k for k in unknown if k in others]
    if foreign:
        raise UserError(
            f"student config {path}: {foreign[0]!r} is not a {student_type} setting (it would be ignored); "
            f"the {student_type} sizes are {', '.join(sizes)}"
        )
    if unknown:
        logger.warning(
            "Student config %s: %s not %s settings (ignored)", path, ", ".join(map(repr, unknown)), student_type
        )
    return config


def _config_keys(row) -> set[str]:
    """Every setting name (and alias) of a family's config."""
    config_class = row.config_cls()
    return set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}) or {})


def _is_local_path(name: str) -> bool:
    """Whether --teacher_name names a folder rather than a Hub id (`name` or `org/name`)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/") or os.path.exists(name)


def check_teacher_folder(name: str, teacher_type: str | None = None) -> Path | None:
    """Refuse a local teacher folder whose files are broken, before any model loads: no config.json, a
    config.json that is not JSON or has wrongly typed fields, weights cut short, no tokenizer files
    or tokenizer files that are not JSON (`model_files`). Returns the folder, or None for a Hub id."""
    require_no_symlink_loop(name, "--teacher_name")
    if not _is_local_path(name):
        return None
    folder = Path(name).expanduser()
    if not folder.exists():
        raise UserError(f"--teacher_name: the folder {name} does not exist (a Hub id is `name` or `org/name`)")
    if not folder.is_dir():
        raise UserError(f"--teacher_name: {folder} is a file, not a model folder")
    if not (folder / "config.json").is_file():
        raise UserError(f"--teacher_name: {folder} has no config.json (save the teacher with save_pretrained)")
    try:
        config_class = ARCHITECTURES[teacher_type].config_cls() if teacher_type else None
        check_model_folder(folder, "save the teacher's tokenizer into it with tokenizer.save_pretrained", config_class)
    except UserError as e:
        raise UserError(f"--teacher_name: {e}") from None
    return folder


def empty_model(row, config):
    """The `row` family's LM for `config` with its parameters on the meta device: no memory, no values.

    Buffers are real (a rotary embedding's frequencies, position ids are computed from the config,
    not saved). Under --fsdp every rank but 0 builds its models so, and `sharding.shard` fills their
    shards with rank 0's weights.
    """
    from accelerate import init_empty_weights  # only under --fsdp, on the ranks that read no weights

    with init_empty_weights(include_buffers=False):
        model = row.lm_cls()(config)
    model.tie_weights()  # the context makes a new parameter of each assignment, tied ones included
    return model


def load_teacher(options: RunOptions, *, weights: bool = True):
    """The teacher's tokenizer and LM, refused unless every weight of the LM (its head included) was trained
    and the tokenizer is the LM's (no id beyond its vocabulary, its padding id).

    weights False: the LM is built empty from the folder's config (`empty_model`), its weights unread.
    """
    folder = check_teacher_folder(options.teacher_name, options.teacher_type)
    row = ARCHITECTURES[options.teacher_type]
    try:
        tokenizer = AutoTokenizer.from_pretrained(options.teacher_name, cache_dir=options.cache_dir)
    except (OSError, ValueError) as e:
        raise UserError(
            f"--teacher_name: cannot load the tokenizer of {options.teacher_name}: {first_line(e)}"
        ) from None
    if not weights:
        try:
            config = row.config_cls().from_pretrained(options.teacher_name, cache_dir=options.cache_dir)
        except (OSError, ValueError) as e:
            raise UserError(
                f"--teacher_name: cannot load the config of {options.teacher_name}: {first_line(e)}"
            ) from None
        return tokenizer, empty_model(row, config)
    try:
        teacher, info = row.lm_cls().from_pretrained(
            options.teacher_name, cache_dir=options.cache_dir, output_loading_info=True, weights_only=True
        )
    except Exception as e:  # many types (OSError, SafetensorError, UnpicklingError, ...) for one cause: bad files
        problem = weights_problem(weights_file(folder) if folder else None, e) or first_line(e)
        raise UserError(f"--teacher_name: cannot load the teacher {options.teacher_name}: {problem}") from None
    if teacher.config.model_type != options.teacher_type:
        raise UserError(
            f"--teacher_name {options.teacher_name} is a {teacher.config.model_type}, not a {options.teacher_type}"
        )
    try:
        check_tokenizer_fits(tokenizer, teacher.config, options.teacher_name)
    except UserError as e:
        raise UserError(f"--teacher_name: {e}") from None
    tied = _tied_sources(teacher)
    missing = sorted(k for k in info["missing_keys"] if k not in tied or tied[k] in info["missing_keys"])
    head = [k for k in missing if not k.startswith(row.backbone + ".")]
    if head:
        raise UserError(
            f"teacher {options.teacher_name} has no trained LM head (missing {', '.join(head[:3])}"
            f"{'...' if len(head) > 3 else ''}): a bare encoder is not a teacher; see scripts/fit_mlm_head.py"
        )
    if missing:
        raise UserError(
            f"teacher {options.teacher_name} lacks {len(missing)} weights (e.g. {missing[0]}): they would be random"
        )
    return tokenizer, teacher


def _tied_sources(model) -> dict[str, str]:
    """Tied parameter name -> the name it shares its tensor with (a tied copy is never saved)."""
    keys = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return dict(keys) if isinstance(keys, dict) else {k: k for k in keys}


def load_student(options: RunOptions, teacher_config, *, weights: bool = True):
    """A student built from --student_config (and --student_pretrained_weights), sized for the teacher.

    weights False: built empty (`empty_model`), without initialising or reading any weight.
    """
    row = ARCHITECTURES[options.student_type]
    config = check_student_config(options.student_config, options.student_type)
    config.output_hidden_states = False
    if row.init_range_from_flag:
        config.initializer_range = options.initializer_range
    try:
        student = row.lm_cls()(config) if weights else empty_model(row, config)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(
            f"student config {options.student_config}: cannot build a {options.student_type}: {one_line(e)}"
        ) from None
    if options.student_pretrained_weights is not None and weights:
        load_student_weights(student, options.student_pretrained_weights, options.student_type)
    s_vocab, t_vocab = student.config.vocab_size, teacher_config.vocab_size
    if s_vocab != t_vocab:
        raise UserError(f"student vocab size {s_vocab} != teacher vocab size {t_vocab}")
    if max_positions(student.config) < max_positions(teacher_config):
        raise UserError(
            f"student accepts {max_positions(student.config)} positions, teacher {max_positions(teacher_config)}"
        )
    return student


# Config keys that say nothing of the student's architecture: bookkeeping, the init range (the weights
# come from the state), and what save_pretrained adds.
NOT_ARCHITECTURE = (
    "transformers_version",
    "architectures",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "initializer_range",
)


def check_resumed_student(config, run_dir: Path, student_config: str) -> None:
    """--resume: refuse a --student_config that builds another student than the one the run trained
    (its config.json); a run folder without one (made before runs wrote it) is not checked."""
    saved_file = Path(run_dir) / "config.json"
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(saved, dict):
        return
    now = config.to_dict()
    saved = type(config).from_dict(saved).to_dict() if saved.get("model_type") == now.get("model_type") else saved
    changed = sorted(k for k in set(saved) | set(now) if k not in NOT_ARCHITECTURE and saved.get(k) != now.get(k))
    if changed:
        what = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        raise UserError(
            f"--resume: --student_config {student_config} builds another student than the run's ({saved_file}): "
            f"{what}{'...' if len(changed) > 3 else ''}; resume with the run's student config, or start a new run"
        )


def load_student_weights(student, path: str, student_type: str) -> None:
    """Load a state dict (read without running code) into `student`; UserError for a file that is not
    one, or a tensor whose shape differs from the student's."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UserError(
                f"refused student weights {path}: it holds objects a state dict never has "
                "(tampered, or not a state dict); nothing in it was run"
            ) from None
        raise UserError(f"cannot read student weights {path}: {first_line(e)}") from None
    except Exception as e:  # truncated zip, bad CRC, empty or foreign bytes
        raise UserError(
            f"cannot read student weights {path} (truncated or not a torch file): {first_line(e)}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"student weights {path} is not a state dict (a dict of parameter name -> tensor)")
    own = student.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise UserError(
                f"student weights {path}: {key} has shape {tuple(tensor.shape)}, the student's "
                f"(--student_config) {tuple(own[key].shape)}"
            )
    result = student.load_state_dict(state, strict=False)
    loaded = set(state) - set(result.unexpected_keys)
    if not loaded:
        raise UserError(f"none of the weights in {path} match a {student_type} student (e.g. {next(iter(state), '?')})")
    missing = [k for k in result.missing_keys if k not in _tied_sources(student)]
    if missing or result.unexpected_keys:
        logger.warning(
            "Student weights: %d missing (%s...), %d unexpected", len(missing), missing[:3], len(result.unexpected_keys)
        )


def teacher_dtype(config: TrainingConfig, options: RunOptions, device: torch.device) -> torch.dtype | None:
    """The teacher's weight dtype: None (float32) without --teacher_fp16, else the autocast dtype.

    Under --bf16 bfloat16, under --fp16 float16: the teacher then runs in the dtype the autocast
    region computes in (a bfloat16 teacher under float16 autocast fails in LayerNorm on CPU).
    Without mixed precision: float16 on GPU, bfloat16 on CPU (float16 matmuls are slow there).
    """
    if not options.teacher_fp16:
        return None
    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def freeze_embeddings(student, options: RunOptions) -> None:
    """Stop the gradients of the student's position / token type embeddings (--freeze_pos_embs, ...)."""
    row = ARCHITECTURES[options.student_type]
    for flag, path in (
        ("freeze_pos_embs", row.position_embeddings),
        ("freeze_token_type_embds", row.token_type_embeddings),
    ):
        if getattr(options, flag):
            student.get_submodule(path).weight.requires_grad = False
