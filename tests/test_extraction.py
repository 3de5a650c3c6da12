"""Student extraction: the blocks chosen, what is copied per family, the student folder, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tr
from conftest import DECODER_FAMILIES, save_tiny_decoder_teacher

from scripts import extract, extract_distilbert
from scripts.extraction import teacher_layers
from utils import UserError


@pytest.fixture(scope="module")
def decoder_teachers(tmp_path_factory) -> dict:
    """A 4-block random teacher folder (model + word-level tokenizer) per decoder family."""
    root = tmp_path_factory.mktemp("decoder_teachers")
    return {family: save_tiny_decoder_teacher(family, root / family) for family in DECODER_FAMILIES}


def _reference_student(teacher, layers):
    """The teacher with only `layers` kept, built by hand from its modules."""
    ref = copy.deepcopy(teacher)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in layers])
    ref.config.num_hidden_layers = len(layers)
    if getattr(ref.config, "layer_types", None):
        ref.config.layer_types = [ref.config.layer_types[i] for i in layers]
    return ref.eval()


# ----------------------------------------------------------------------------------------------- the blocks


def test_default_blocks_are_evenly_spaced_keeping_first_and_last():
    assert teacher_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert teacher_layers(4, 2) == [0, 3]
    assert teacher_layers(4, 1) == [0]
    assert teacher_layers(4, 4) == [0, 1, 2, 3]


def test_twelve_block_teacher_keeps_the_originals_lists():
    assert teacher_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert teacher_layers(12, 3) == [0, 2, 4]
    assert teacher_layers(12, 9) == [0, 2, 3, 4, 7, 8, 9, 10, 11]


def test_layer_selection_even_always_spreads_and_original_refuses_sizes_it_has_no_list_for():
    assert teacher_layers(12, 3, method="even") == [0, 6, 11]
    assert teacher_layers(12, 9, method="even") == [0, 1, 3, 4, 6, 7, 8, 10, 11]
    assert teacher_layers(12, 3, method="original") == teacher_layers(12, 3) == [0, 2, 4]
    assert teacher_layers(12, 8, original_7_and_8=True, method="original") == [0, 2, 3, 4, 7, 8, 9, 10]
    assert teacher_layers(30, 10, method="even") == teacher_layers(30, 10)
    assert teacher_layers(4, 2, explicit=[1, 2], method="even") == [1, 2]  # --teacher_layers wins
    for n_teacher, n_student in [(12, 8), (12, 10), (30, 10)]:
        with pytest.raises(UserError, match=f"--layer_selection original: .* {n_student} of {n_teacher} blocks"):
            teacher_layers(n_teacher, n_student, method="original")


@pytest.mark.parametrize("selection, expected", [(None, [0, 2, 4]), ("original", [0, 2, 4]), ("even", [0, 6, 11])])
def test_extract_layer_selection_flag_of_a_12_block_teacher(tmp_path, selection, expected):
    torch.manual_seed(0)
    config = tr.GPT2Config(vocab_size=64, n_embd=16, n_layer=12, n_head=2, n_positions=40)
    tr.GPT2LMHeadModel(config).save_pretrained(tmp_path / "g")
    out = tmp_path / "s.pth"
    argv = ["--model_type", "gpt2", "--model_name", str(tmp_path / "g"), "--dump_checkpoint", str(out)]
    state = extract.main(argv + ["--num_layers", "3"] + ["--layer_selection", selection] * (selection is not None))
    teacher = tr.GPT2LMHeadModel.from_pretrained(tmp_path / "g").state_dict()
    key = "transformer.h.{}.mlp.c_fc.weight"
    for s_idx, t_idx in enumerate(expected):
        assert torch.equal(state[key.format(s_idx)], teacher[key.format(t_idx)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "s.pth"]  # no selection report without a measurement


@pytest.mark.parametrize("n", [7, 8])
def test_bert_to_distilbert_7_and_8_blocks_take_the_originals_first_of_nine(tmp_path, n):
    torch.manual_seed(0)
    config = tr.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    tr.BertForMaskedLM(config).save_pretrained(tmp_path / "bert12")
    out = tmp_path / f"student_{n}.pth"
    state = extract_distilbert.main(
        ["--model_name", str(tmp_path / "bert12"), "--dump_checkpoint", str(out), "--num_layers", str(n)]
    )
    teacher = tr.BertForMaskedLM.from_pretrained(tmp_path / "bert12").state_dict()
    expected = [0, 2, 3, 4, 7, 8, 9, 10, 11][:n]
    for s_idx, t_idx in enumerate(expected):
        assert torch.equal(
            state[f"distilbert.transformer.layer.{s_idx}.ffn.lin1.weight"],
            teacher[f"bert.encoder.layer.{t_idx}.intermediate.dense.weight"],
        )
    assert f"distilbert.transformer.layer.{n}.ffn.lin1.weight" not in state
    assert teacher_layers(12, n) != expected  # the other scripts keep their even spread


# ----------------------------------------------------------------------------------------------- roberta, gpt2


def _roberta_keys(layers: int, vocab_transform: bool) -> set[str]:
    # The keys the RoBERTa extraction has always written, spelt out.
    block = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    ]
    keys = {
        f"roberta.embeddings.{w}.weight" for w in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    keys |= {f"roberta.embeddings.LayerNorm.{w}" for w in ("weight", "bias")}
    keys |= {f"roberta.encoder.layer.{i}.{m}.{w}" for i in range(layers) for m in block for w in ("weight", "bias")}
    keys |= {"lm_head.decoder.weight", "lm_head.bias"}
    if vocab_transform:
        keys |= {f"lm_head.{m}.{w}" for m in ("dense", "layer_norm") for w in ("weight", "bias")}
    return keys


def _gpt2_keys(layers: int) -> set[str]:
    block = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    keys = {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "lm_head.weight",
    }
    return keys | {f"transformer.h.{i}.{m}.{w}" for i in range(layers) for m in block for w in ("weight", "bias")}


@pytest.mark.parametrize("vocab_transform", [False, True])
def test_roberta_extraction_writes_the_same_keys_as_before(tmp_path, vocab_transform):
    torch.manual_seed(0)
    config = tr.RobertaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        pad_token_id=1,
    )
    tr.RobertaForMaskedLM(config).save_pretrained(tmp_path / "rob")
    argv = [
        "--model_type",
        "roberta",
        "--model_name",
        str(tmp_path / "rob"),
        "--num_layers",
        "2",
        "--dump_checkpoint",
        str(tmp_path / "s.pth"),
    ] + ["--vocab_transform"] * vocab_transform
    state = extract.main(argv)
    assert set(state) == _roberta_keys(2, vocab_transform)
    teacher = tr.RobertaForMaskedLM.from_pretrained(tmp_path / "rob").state_dict()
    assert torch.equal(
        state["roberta.encoder.layer.1.output.dense.weight"], teacher["roberta.encoder.layer.3.output.dense.weight"]
    )
    assert set(torch.load(tmp_path / "s.pth", weights_only=True)) == set(state)


def test_gpt2_extraction_writes_the_same_keys_as_before(tmp_path):
    torch.manual_seed(0)
    config = tr.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=4, n_head=2, n_positions=40, bos_token_id=0, eos_token_id=0
    )
    tr.GPT2LMHeadModel(config).save_pretrained(tmp_path / "g")
    state = extract.main(
        [
            "--model_type",
            "gpt2",
            "--model_name",
            str(tmp_path / "g"),
            "--teacher_layers",
            "1,2",
            "--dump_checkpoint",
            str(tmp_path / "s.pth"),
        ]
    )
    assert set(state) == _gpt2_keys(2)
    teacher = tr.GPT2LMHeadModel.from_pretrained(tmp_path / "g").state_dict()
    assert torch.equal(state["transformer.h.0.mlp.c_fc.weight"], teacher["transformer.h.1.mlp.c_fc.weight"])


# ----------------------------------------------------------------------------------------------- decoders


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_student_folder_equals_the_teacher_with_only_the_chosen_blocks(tmp_path, decoder_teachers, family):
    folder = tmp_path / "student"
    state = extract.main(
        [
            "--model_type",
            family,
            "--model_name",
            str(decoder_teachers[family]),
            "--layers",
            "0,3",
            "--dump_checkpoint",
            str(tmp_path / "s.pth"),
            "--dump_folder",
            str(folder),
        ]
    )
    teacher = tr.AutoModelForCausalLM.from_pretrained(decoder_teachers[family]).eval()
    student = tr.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    ids = torch.randint(4, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _reference_student(teacher, [0, 3])(input_ids=ids, use_cache=False).logits
        got = student(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected)
    # The .pth loads into the same student; the head is the teacher's, tied or not.
    saved = torch.load(tmp_path / "s.pth", weights_only=True)
    assert set(saved) == set(state) and all(k in student.state_dict() for k in saved)
    assert torch.equal(saved["lm_head.weight"], teacher.lm_head.weight)
    tied = teacher.config.tie_word_embeddings
    assert torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"]) == tied
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    tokenizer = tr.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.get_vocab() == tr.AutoTokenizer.from_pretrained(decoder_teachers[family]).get_vocab()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_layers", "9"], "cannot extract 9 layers from 4"),
        (["--layers", "0,7"], "block 7 is out of range for a 4-block teacher"),
        (["--layers", "0,2,2"], "block 2 is listed more than once"),
        (["--layers", "3,1"], r"must be increasing .*got \[3, 1\]"),
        (["--layers", "0,x"], "'x' is not a block index"),
        (["--layers", "0", "2", "--num_layers", "3"], "2 teacher layers given for a 3-layer student"),
    ],
)
def test_bad_block_choices_are_one_line_errors(tmp_path, decoder_teachers, flags, message):
    with pytest.raises(UserError, match=message) as err:
        extract.main(
            [
                "--model_type",
                "llama",
                "--model_name",
                str(decoder_teachers["llama"]),
                "--dump_checkpoint",
                str(tmp_path / "s.pth"),
            ]
            + flags
        )
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s.pth").exists()


@pytest.mark.parametrize("target", ["checkpoint_under_a_file", "checkpoint_is_a_folder", "folder_not_empty"])
def test_unwritable_outputs_are_refused_before_the_teacher_is_loaded(tmp_path, target):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    checkpoint = {
        "checkpoint_under_a_file": tmp_path / "a_file" / "s.pth",
        "checkpoint_is_a_folder": tmp_path / "full",
    }.get(target, tmp_path / "s.pth")
    argv = [
        "--model_type",
        "llama",
        "--model_name",
        str(tmp_path / "no_such_teacher"),
        "--dump_checkpoint",
        str(checkpoint),
    ]
    if target == "folder_not_empty":
        argv += ["--dump_folder", str(tmp_path / "full")]
    with pytest.raises(UserError, match="--dump_(checkpoint|folder)") as err:
        extract.main(argv)
    assert "no_such_teacher" not in str(err.value)  # refused before any attempt to load it
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
