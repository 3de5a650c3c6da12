"""Every per-architecture fact, one row per model family (pyvene style).

A row says which Hugging Face classes a family uses, where its parts live, how its head is
applied, how its sequences are framed and tokenized, what it is trained on (MLM or CLM), which
teacher families a student of it may be distilled from, and how a student is extracted from it.
Training (`causal_train.py`), interventions (`interventions.py`), the dataset
(`lm_seqs_dataset.py`), binarization and extraction read this table instead of branching on the
model type. Adding a family is adding a row (and a tiny config in the tests). The model helpers at
the end (`backbone`, `transformer_blocks`, `lm_head_logits`, `num_layers`, ...) find a model's parts through
its row.

Paths are dotted attribute paths: `backbone` relative to the LM model, `blocks` and `final_norm`
relative to the backbone, the embedding tables relative to the LM model. Extraction layouts are
state-dict key prefixes of the LM model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from utils import UserError

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ExtractionLayout",
    "SPECIAL_TOKENS",
    "backbone",
    "check_student_teacher",
    "final_norm",
    "get_architecture",
    "head_slice_width",
    "hidden_size",
    "lm_head_logits",
    "max_positions",
    "num_heads",
    "num_layers",
    "special_token_ids",
    "student_types",
    "teacher_types",
    "tokenizer_framing",
    "transformer_blocks",
    "unwrap",
]

# Tokenizer attributes collected into the special-id table training and the dataset use.
SPECIAL_TOKENS = ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token", "bos_token", "eos_token")


def _bert_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.cls(hidden)


def _distilbert_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    x = model.vocab_transform(hidden)
    x = model.activation(x)
    x = model.vocab_layer_norm(x)
    return model.vocab_projector(x)


def _lm_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden)


@dataclass(frozen=True)
class ExtractionLayout:
    """Where `scripts/extract.py` copies a same-family student from (LM-model state-dict key prefixes).

    blocks: prefix of the block list; `<blocks>.<t>.*` of the chosen teacher blocks become
        `<blocks>.<s>.*` of the student, in order.
    embeddings, final_norm, head: copied unchanged (a key equals a prefix or starts with `prefix.`).
    head_transform: also copied with --vocab_transform (RoBERTa's dense + layer norm before the decoder).
    """

    blocks: str
    embeddings: tuple[str, ...]
    final_norm: tuple[str, ...] = ()
    head: tuple[str, ...] = ()
    head_transform: tuple[str, ...] = ()


@dataclass(frozen=True)
class Architecture:
    """One model family. `name` is both `config.model_type` and the --student_type / --teacher_type value.

    config_class, lm_class, tokenizer_class: names in `transformers` (resolved when used, so reading
        the table imports no modeling code).
    objective: "mlm" or "clm".
    teachers: teacher families a student of this family may be distilled from (empty: not a student).
    backbone: attribute of the LM model holding the base model; blocks: the `nn.ModuleList` of
        transformer blocks (relative to the backbone); final_norm: a norm after the last block
        (relative to the backbone), or None. The intervention site of block k is its output, before
        the final norm.
    head: `head(lm_model, hidden) -> logits`, hidden `(..., dim)` -> `(..., vocab)`, hidden being the
        backbone's `last_hidden_state` (after the final norm).
    forward_kwargs: extra keyword arguments for every forward (decoders: no KV cache, which would
        otherwise be built and mutated by every run).
    token_embeddings: the token-embedding module (relative to the LM model). Gemma's multiplies its
        rows by sqrt(hidden_size) inside this module, so a replayed lookup includes the scaling.
    position_kind: "learned", "sinusoidal" or "rotary"; position_embeddings: the learned table that
        --freeze_pos_embs freezes (None: nothing to freeze); token_type_embeddings likewise for
        --freeze_token_type_embds.
    start_token, end_token: tokenizer attributes of the tokens that frame every binarized sequence
        (start None: the family's tokenizers define no start token, sequences only end with end_token).
    positions_reserved: RoBERTa reserves `pad_token_id + 1` position ids, so it accepts fewer inputs.
    init_range_from_flag: the student's config takes --initializer_range (DistilBERT, as in the original).
    extraction: how scripts/extract.py builds a student of this family from a teacher of it (None:
        another script, e.g. BERT -> DistilBERT in scripts/extract_distilbert.py).
    """

    name: str
    config_class: str
    lm_class: str
    objective: str
    teachers: tuple[str, ...]
    backbone: str
    blocks: str
    final_norm: str | None
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    token_embeddings: str
    position_kind: str
    position_embeddings: str | None
    start_token: str | None
    end_token: str
    tokenizer_class: str
    token_type_embeddings: str | None = None
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    positions_reserved: bool = False
    init_range_from_flag: bool = False
    extraction: ExtractionLayout | None = None

    def config_cls(self) -> type:
        import transformers

        return getattr(transformers, self.config_class)

    def lm_cls(self) -> type:
        import transformers

        return getattr(transformers, self.lm_class)


def _decoder(name: str, prefix: str, teachers: tuple[str, ...], start_token: str | None = "bos_token") -> Architecture:
    """A Llama-style decoder: `model.embed_tokens`, `model.layers`, `model.norm`, `lm_head`, rotary positions."""
    return Architecture(
        name=name,
        config_class=f"{prefix}Config",
        lm_class=f"{prefix}ForCausalLM",
        objective="clm",
        teachers=teachers,
        backbone="model",
        blocks="layers",
        final_norm="norm",
        head=_lm_head,
        token_embeddings="model.embed_tokens",
        position_kind="rotary",
        position_embeddings=None,
        start_token=start_token,
        end_token="eos_token",
        tokenizer_class="AutoTokenizer",
        forward_kwargs={"use_cache": False},
        extraction=ExtractionLayout("model.layers", ("model.embed_tokens",), ("model.norm",), ("lm_head",)),
    )


_ROWS = [
    Architecture(
        name="bert",
        config_class="BertConfig",
        lm_class="BertForMaskedLM",
        objective="mlm",
        teachers=(),
        backbone="bert",
        blocks="encoder.layer",
        final_norm=None,
        head=_bert_head,
        token_embeddings="bert.embeddings.word_embeddings",
        position_kind="learned",
        position_embeddings="bert.embeddings.position_embeddings",
        token_type_embeddings="bert.embeddings.token_type_embeddings",
        start_token="cls_token",
        end_token="sep_token",
        tokenizer_class="BertTokenizer",
    ),
    Architecture(
        # position_kind "learned": a config with sinusoidal_pos_embds=True fills the same table with fixed values.
        name="distilbert",
        config_class="DistilBertConfig",
        lm_class="DistilBertForMaskedLM",
        objective="mlm",
        teachers=("bert",),
        backbone="distilbert",
        blocks="transformer.layer",
        final_norm=None,
        head=_distilbert_head,
        token_embeddings="distilbert.embeddings.word_embeddings",
        position_kind="learned",
        position_embeddings="distilbert.embeddings.position_embeddings",
        start_token="cls_token",
        end_token="sep_token",
        tokenizer_class="BertTokenizer",
        init_range_from_flag=True,
    ),
    Architecture(
        name="roberta",
        config_class="RobertaConfig",
        lm_class="RobertaForMaskedLM",
        objective="mlm",
        teachers=("roberta",),
        backbone="roberta",
        blocks="encoder.layer",
        final_norm=None,
        head=_lm_head,
        token_embeddings="roberta.embeddings.word_embeddings",
        position_kind="learned",
        position_embeddings="roberta.embeddings.position_embeddings",
        token_type_embeddings="roberta.embeddings.token_type_embeddings",
        start_token="cls_token",
        end_token="sep_token",
        tokenizer_class="RobertaTokenizer",
        positions_reserved=True,
        extraction=ExtractionLayout(
            "roberta.encoder.layer",
            ("roberta.embeddings",),
            head=("lm_head.decoder.weight", "lm_head.bias"),
            head_transform=("lm_head.dense", "lm_head.layer_norm"),
        ),
    ),
    Architecture(
        name="gpt2",
        config_class="GPT2Config",
        lm_class="GPT2LMHeadModel",
        objective="clm",
        teachers=("gpt2",),
        backbone="transformer",
        blocks="h",
        final_norm="ln_f",
        head=_lm_head,
        token_embeddings="transformer.wte",
        position_kind="learned",
        position_embeddings="transformer.wpe",
        start_token="bos_token",
        end_token="eos_token",
        tokenizer_class="GPT2Tokenizer",
        forward_kwargs={"use_cache": False},
        extraction=ExtractionLayout(
            "transformer.h", ("transformer.wte", "transformer.wpe"), ("transformer.ln_f",), ("lm_head",)
        ),
    ),
    _decoder("llama", "Llama", ("llama",)),
    _decoder("mistral", "Mistral", ("mistral",)),
    # Qwen2 and Qwen3 share one tokenizer (151k ids), which defines no start token.
    _decoder("qwen2", "Qwen2", ("qwen2", "qwen3"), start_token=None),
    _decoder("qwen3", "Qwen3", ("qwen3", "qwen2"), start_token=None),
    _decoder("gemma", "Gemma", ("gemma",)),
]

ARCHITECTURES: dict[str, Architecture] = {row.name: row for row in _ROWS}


def student_types() -> list[str]:
    """Families that can be students (--student_type choices), in table order."""
    return [row.name for row in _ROWS if row.teachers]


def teacher_types() -> list[str]:
    """Families some student can be distilled from (--teacher_type choices), in table order."""
    named = {t for row in _ROWS for t in row.teachers}
    return [row.name for row in _ROWS if row.name in named]


def tokenizer_framing(family: str) -> tuple[str, str | None, str]:
    """What binarizing a corpus for `family` needs: (tokenizer class in transformers, start token
    attribute or None, end token attribute)."""
    row = ARCHITECTURES[family]
    return row.tokenizer_class, row.start_token, row.end_token


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DataParallel / DistributedDataParallel wrapper (or the model itself)."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


# Config rates of parts the distiller never runs (classification and summary heads).
_UNUSED_DROPOUT_PREFIXES = ("classifier", "summary", "qa_", "seq_classif")


def has_dropout(model: nn.Module) -> bool:
    """Whether `model` in training mode draws random dropout masks: a dropout module with p > 0, or a
    non-zero config rate that attention applies functionally (e.g. Llama's `attention_dropout`)."""
    inner = unwrap(model)
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in inner.modules()):
        return True
    config = getattr(inner, "config", None)
    rates = config.to_dict().items() if config is not None else ()
    return any(
        ("dropout" in key or "pdrop" in key)
        and not key.startswith(_UNUSED_DROPOUT_PREFIXES)
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        for key, value in rates
    )


def get_architecture(model_or_config: Any) -> Architecture:
    """The row of a model (LM or base model, possibly inside (D)DP) or config, by `config.model_type`."""
    inner = unwrap(model_or_config) if isinstance(model_or_config, nn.Module) else model_or_config
    config = getattr(inner, "config", inner) if isinstance(inner, nn.Module) else inner
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        what = type(inner).__name__
        raise UserError(
            f"unsupported model {what} (model_type={model_type!r}); supported model types: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def check_student_teacher(student_type: str, teacher_type: str, mlm: bool) -> None:
    """Refuse a student/teacher pair the objective or the table does not allow (UserError)."""
    student, teacher = ARCHITECTURES[student_type], ARCHITECTURES[teacher_type]
    objective = "mlm" if mlm else "clm"
    if student.objective != objective or teacher.objective != objective:
        students = "/".join(s for s in student_types() if ARCHITECTURES[s].objective == objective)
        teachers = "/".join(t for t in teacher_types() if ARCHITECTURES[t].objective == objective)
        need = "--mlm needs" if mlm else "causal LM (no --mlm) needs"
        raise UserError(
            f"{need} a {students} student and a {teachers} teacher "
            f"(got --student_type {student_type} --teacher_type {teacher_type})"
        )
    if teacher_type not in student.teachers:
        raise UserError(
            f"a {student_type} student cannot be distilled from a {teacher_type} teacher "
            f"(a {student_type} student takes: {', '.join(student.teachers)})"
        )


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """`{attribute: id}` of the `SPECIAL_TOKENS` the tokenizer defines (undefined ones are left out)."""
    out = {}
    for name in SPECIAL_TOKENS:
        token = getattr(tokenizer, name, None)
        if token is not None:
            out[name] = int(tokenizer.convert_tokens_to_ids(str(token)))
    return out


def max_positions(config: Any) -> int:
    """Longest input the model accepts (RoBERTa reserves padding_idx + 1 position ids)."""
    n = getattr(config, "max_position_embeddings", None) or config.n_positions
    row = ARCHITECTURES.get(config.model_type)
    if row is not None and row.positions_reserved:
        n -= config.pad_token_id + 1
    return int(n)


# ----------------------------------------------------------------------------------------------
# A model's parts and sizes, found through its row
# ----------------------------------------------------------------------------------------------


def backbone(model: nn.Module) -> nn.Module:
    """The base model (`BertModel`, `GPT2Model`, `LlamaModel`, ...) of `model` (possibly inside (D)DP).

    A base model is its own backbone (the same rule as Hugging Face's `base_model`).
    """
    inner = unwrap(model)
    return getattr(inner, get_architecture(inner).backbone, inner)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The `nn.ModuleList` of transformer blocks of `model` (block k's output is `hidden_states[k + 1]`)."""
    return backbone(model).get_submodule(get_architecture(model).blocks)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last block (decoders' `ln_f` / `norm`), or None."""
    path = get_architecture(model).final_norm
    return None if path is None else backbone(model).get_submodule(path)


def lm_head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head of `model` to final hidden states of any leading shape.

    hidden: `(..., dim)`, e.g. `(bs, seq, dim)` or `(n_selected, dim)` rows picked out of it;
    it is the backbone's `last_hidden_state` (for decoders, after the final norm). Returns `(..., vocab_size)`.
    """
    inner = unwrap(model)
    if backbone(inner) is inner:
        raise UserError(f"{type(inner).__name__} has no LM head; use the *ForMaskedLM / *LMHeadModel class")
    return get_architecture(inner).head(inner, hidden)


def num_layers(model_or_config: nn.Module | Any) -> int:
    """Number of transformer blocks (`num_hidden_layers` / `n_layers` / `n_layer`)."""
    return int(_config(model_or_config).num_hidden_layers)


def num_heads(model_or_config: nn.Module | Any) -> int:
    """Number of attention heads (`num_attention_heads` / `n_heads` / `n_head`)."""
    return int(_config(model_or_config).num_attention_heads)


def hidden_size(model_or_config: nn.Module | Any) -> int:
    """Width of the hidden state (`hidden_size` / `dim` / `n_embd`)."""
    return int(_config(model_or_config).hidden_size)


def head_slice_width(model_or_config: nn.Module | Any) -> int:
    """Width `w` of one `$H` slice of the residual stream: hidden_size // num_attention_heads.

    Never `config.head_dim` nor anything of `num_key_value_heads` (see docs/interventions.md, the `$H` rule).
    """
    return hidden_size(model_or_config) // num_heads(model_or_config)


def _config(model_or_config: nn.Module | Any) -> Any:
    # Hugging Face configs alias `num_hidden_layers`, `num_attention_heads` and `hidden_size` onto
    # DistilBERT's and GPT-2's own key names through `attribute_map`, so one spelling serves all four.
    if isinstance(model_or_config, nn.Module):
        return unwrap(model_or_config).config
    return model_or_config
