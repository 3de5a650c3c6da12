"""Reading the evaluation scripts' data: local files or a Hub data set, checked column by column.

`load_local_files` reads each split's file with the loader for its suffix; the `require_*` checks
name the file and the column when a column is missing or holds the wrong type; the labels or tags
of the evaluation splits are checked against the training split's (`check_seen_in_training`).
Every problem is a `UserError` naming the flag or the file. The scripts keep their task tables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, load_dataset

from utils import UserError, one_line, require_file, require_no_symlink_loop

logger = logging.getLogger(__name__)

# The `datasets` builder that reads a file ("csv", "json", "text"), or a function
# (path, split, cache_dir) -> Dataset for a layout no builder reads.
FileLoader = str | Callable[[str, str, str | None], Dataset]


def where(split: str, files: Mapping[str, str]) -> str:
    """The file a split was read from, or `the <split> split`, for error messages."""
    return files.get(split, f"the {split} split")


def error_cause(error: BaseException) -> str:
    """The most telling message of an error chain: the first cause below the library's wrappers."""
    chain = []
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        message = " ".join(str(e).split())
        if message and not isinstance(e, datasets.exceptions.DatasetGenerationError):
            return message
    return type(chain[-1]).__name__


def given_files(data_args: object, splits: Sequence[str]) -> dict[str, str]:
    """Split -> path, for the splits (in `splits` order) whose `--{split}_file` was given."""
    paths = {split: getattr(data_args, f"{split}_file") for split in splits}
    return {split: path for split, path in paths.items() if path is not None}


def load_local_files(
    files: Mapping[str, str], file_loaders: Mapping[str, FileLoader], cache_dir: str | None, expected: str
) -> DatasetDict:
    """Read each split's file (`files`: split -> path) with the loader for its suffix.

    A missing file, a suffix not in `file_loaders` (the error says the file `must be {expected}`) or
    an unreadable file raises a `UserError` naming the flag or the file.
    """
    raw = DatasetDict()
    for split, path in files.items():
        require_no_symlink_loop(path, f"--{split}_file")
        loader = file_loaders.get(require_file(path, f"--{split}_file").suffix.lower())
        if loader is None:
            raise UserError(f"--{split}_file must be {expected}: {path}")
        try:  # the loaders hide why a file cannot be opened ("An error occurred while generating the dataset")
            with open(path, "rb") as f:
                empty = not f.read(1)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or one_line(e)}") from None
        if empty:
            raise UserError(f"--{split}_file {path} is empty")
        try:
            raw[split] = (
                load_dataset(loader, data_files={split: path}, cache_dir=cache_dir)[split]
                if isinstance(loader, str)
                else loader(path, split, cache_dir)
            )
        except UserError:
            raise
        except Exception as e:  # the loaders raise many types for one cause: a malformed file
            if "corresponds to no data" in str(e):  # a csv file with a header only
                raise UserError(f"--{split}_file {path} holds no rows") from None
            raise UserError(f"cannot read {path}: {error_cause(e)}") from None
        if len(raw[split]) == 0:
            raise UserError(f"--{split}_file {path} holds no rows")
    return raw


def require_columns(dataset: Dataset, columns: Iterable[str], source: str, hint: str | None = None) -> None:
    """Raise a `UserError` naming the first of `columns` missing from `dataset` (read from `source`)."""
    for column in columns:
        if column not in dataset.column_names:
            raise UserError(
                f"column '{column}' not found in {source} (columns: {', '.join(dataset.column_names)})"
                + (f"; {hint}" if hint else "")
            )


def _is_string(arrow_type: pa.DataType) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _is_list(arrow_type: pa.DataType) -> bool:
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)


def describe(arrow_type: pa.DataType) -> str:
    """A column's type in a user's words, for error messages."""
    if _is_list(arrow_type):
        return f"lists of {describe(arrow_type.value_type)}"
    if isinstance(arrow_type, pa.BaseExtensionType):  # how `datasets` reads a json column of mixed types
        return "values of mixed types"
    return {
        "string": "text",
        "large_string": "text",
        "int64": "integers",
        "double": "numbers",
        "bool": "booleans",
        "null": "nothing but nulls",
    }.get(str(arrow_type), str(arrow_type))


def first_null_row(dataset: Dataset, column: str) -> int | None:
    """Index of the first row whose `column` is null (a missing value in the file), or None."""
    values = dataset.data.column(column)
    if values.null_count == 0:
        return None
    return int(pc.index(pc.is_null(values), True).as_py())


def require_text_columns(dataset: Dataset, columns: Iterable[str], source: str) -> None:
    """Raise a `UserError` unless each of `columns` holds one string per row, none missing."""
    for column in columns:
        arrow_type = dataset.data.schema.field(column).type
        if not _is_string(arrow_type):
            raise UserError(f"column '{column}' in {source} must hold text, found {describe(arrow_type)}")
        row = first_null_row(dataset, column)
        if row is not None:
            raise UserError(f"column '{column}' in {source} has no value in row {row + 1}")


def require_list_column(dataset: Dataset, column: str, source: str, item_types: tuple[str, ...]) -> None:
    """Raise a `UserError` unless `column` holds one list per row of `item_types` ("string", "integer")."""
    arrow_type = dataset.data.schema.field(column).type
    ok = _is_list(arrow_type) and any(
        (t == "string" and _is_string(arrow_type.value_type))
        or (t == "integer" and pa.types.is_integer(arrow_type.value_type))
        for t in item_types
    )
    if not ok:
        raise UserError(
            f"column '{column}' in {source} must hold a list of {' or '.join(t + 's' for t in item_types)} "
            f"per row, found {describe(arrow_type)}"
        )
    row = first_null_row(dataset, column)
    if row is None and dataset.data.column(column).combine_chunks().flatten().null_count:
        values = dataset.data.column(column).combine_chunks()
        row = next(i for i, v in enumerate(values.to_pylist()) if None in v)
    if row is not None:
        raise UserError(f"column '{column}' in {source} has a missing value in row {row + 1}")


def require_scalar_column(dataset: Dataset, column: str, source: str, numeric: bool = False) -> None:
    """Raise a `UserError` unless `column` holds one number (or, unless `numeric`, one string) per row."""
    arrow_type = dataset.data.schema.field(column).type
    kinds = [pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean] + ([] if numeric else [_is_string])
    if not any(is_kind(arrow_type) for is_kind in kinds):
        wanted = "a number" if numeric else "an id, a name or a number"
        raise UserError(f"column '{column}' in {source} must hold {wanted} per row, found {describe(arrow_type)}")


def check_seen_in_training(
    ids: Mapping[str, set[int]], names: Sequence, files: Mapping[str, str], what: str, declared: bool
) -> None:
    """Evaluation labels (or tags) that the training split never holds, by class id per split.

    A class that training never shows cannot be learned. When the classes are inferred from the
    files (`declared` False) they are meant to be the training data's, so such a value is refused,
    naming it and both files (Hugging Face's scripts fail there with a KeyError). Classes declared
    by a task's table, the data set's ClassLabel or --label_names stay: a warning names the value,
    whose examples then count as errors.
    """
    if "train" not in ids:
        return
    for split, seen in ids.items():
        unseen = sorted(seen - ids["train"])
        if split == "train" or not unseen:
            continue
        message = (
            f"{what} {names[unseen[0]]!r} in {where(split, files)} never occurs in the training data "
            f"{where('train', files)}"
        )
        if not declared:
            raise UserError(
                f"{message}: no model trained on it can predict it; add training examples with it, or drop those rows"
            )
        logger.warning("%s: the model cannot learn it, and its examples count as errors", message)


def load_hub_dataset(
    name: str, config_name: str | None, cache_dir: str | None, offline_hint: str, shown_as: str | None = None
) -> DatasetDict:
    """A data set from the Hugging Face Hub; failing that, a `UserError` that ends with `offline_hint`.

    `shown_as` is how the error names the data set (default: `name`).
    """
    try:
        return load_dataset(name, config_name, cache_dir=cache_dir)
    except Exception as e:
        raise UserError(
            f"cannot load {shown_as or name} from the Hugging Face Hub: {one_line(e)}; {offline_hint}"
        ) from None
