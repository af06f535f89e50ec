"""What the search page serves and its limits: from the script's own arguments, else environment variables.

`matsearch app --index DIR` starts `streamlit run app/streamlit_app.py -- --index DIR`; tests and other launchers
may set the environment instead (an argument wins over its variable):

    --index DIR          MATSEARCH_APP_INDEX       index folder (default: indexes/fashion-mnist-train, built
                                                   from Fashion-MNIST train with the shipped model if missing)
    --model DIR          MATSEARCH_APP_MODEL       query encoder (default: the model the index was built with)
    --eval-json FILE     MATSEARCH_APP_EVAL_JSON   accuracy-vs-cost records (default: retrieval_eval.json beside
                                                   the model or the index, if there is one)
    --limit N            MATSEARCH_APP_LIMIT       build the default index from the first N images only
    --device DEV         MATSEARCH_APP_DEVICE      cpu (default), cuda, cuda:N or auto
    --max-upload-mb MB   MATSEARCH_APP_MAX_UPLOAD_MB   largest upload accepted (default 10)
    --max-pixels N       MATSEARCH_APP_MAX_PIXELS      largest image accepted, width x height (default 25 M)
    --max-files N        MATSEARCH_APP_MAX_FILES       most query images per search (default 16)
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

DEFAULT_INDEX_DIR = Path("indexes") / "fashion-mnist-train"
DEFAULT_SOURCE = "fashion-mnist:train"
DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_MAX_PIXELS = 25_000_000
DEFAULT_MAX_FILES = 16
EVAL_FILE_NAME = "retrieval_eval.json"

ENV = {
    "index": "MATSEARCH_APP_INDEX",
    "model": "MATSEARCH_APP_MODEL",
    "eval_json": "MATSEARCH_APP_EVAL_JSON",
    "limit": "MATSEARCH_APP_LIMIT",
    "device": "MATSEARCH_APP_DEVICE",
    "max_upload_mb": "MATSEARCH_APP_MAX_UPLOAD_MB",
    "max_pixels": "MATSEARCH_APP_MAX_PIXELS",
    "max_files": "MATSEARCH_APP_MAX_FILES",
}


@dataclass(frozen=True)
class Settings:
    index_dir: Path
    model_dir: Path | None = None
    eval_json: Path | None = None
    default_limit: int | None = None  # size of the default index when the page has to build it
    device: str = "cpu"
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2 ** 20)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = DEFAULT_MAX_FILES
    is_default_index: bool = True  # only the default index is built by the page when it is missing

    @property
    def build_source(self) -> str:
        return DEFAULT_SOURCE


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """The options the page reads; `matsearch app` adds the same ones and passes them on."""
    parser.add_argument("--index", metavar="DIR",
                        help=f"index folder built by `matsearch index build` (default: {DEFAULT_INDEX_DIR}, built "
                             f"from {DEFAULT_SOURCE} with the shipped model on first start if missing)")
    parser.add_argument("--model", metavar="DIR", help="query encoder folder (default: the index's own model)")
    parser.add_argument("--eval-json", metavar="FILE",
                        help=f"evaluation records for the accuracy-vs-cost chart (default: {EVAL_FILE_NAME} "
                             "beside the model or the index)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="build the default index from the first N training images only (quick demos)")
    parser.add_argument("--device", metavar="DEV", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--max-upload-mb", type=float, metavar="MB",
                        help=f"largest query file accepted (default {DEFAULT_MAX_UPLOAD_MB:g})")
    parser.add_argument("--max-pixels", type=int, metavar="N",
                        help=f"largest query image accepted, in pixels (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--max-files", type=int, metavar="N",
                        help=f"most query images per search (default {DEFAULT_MAX_FILES})")


def _positive(name: str, value, kind=int):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return number


def resolve(values: Mapping[str, object], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed option values (None: not given), falling back to the environment, then defaults."""
    environ = os.environ if environ is None else environ

    def pick(key: str):
        value = values.get(key)
        if value is None or value == "":
            value = environ.get(ENV[key]) or None
        return value

    index = pick("index")
    model, eval_json, limit = pick("model"), pick("eval_json"), pick("limit")
    upload_mb, max_pixels, max_files = pick("max_upload_mb"), pick("max_pixels"), pick("max_files")
    return Settings(
        index_dir=Path(index).expanduser() if index else DEFAULT_INDEX_DIR,
        model_dir=Path(model).expanduser() if model else None,
        eval_json=Path(eval_json).expanduser() if eval_json else None,
        default_limit=_positive("--limit", limit) if limit is not None else None,
        device=str(pick("device") or "cpu"),
        max_upload_bytes=int(_positive("--max-upload-mb", upload_mb, float) * 2 ** 20) if upload_mb is not None
        else int(DEFAULT_MAX_UPLOAD_MB * 2 ** 20),
        max_pixels=_positive("--max-pixels", max_pixels) if max_pixels is not None else DEFAULT_MAX_PIXELS,
        max_files=_positive("--max-files", max_files) if max_files is not None else DEFAULT_MAX_FILES,
        is_default_index=not index,
    )


def from_argv(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="streamlit_app.py", allow_abbrev=False)
    add_app_arguments(parser)
    known, _ = parser.parse_known_args(list(argv))
    return resolve(vars(known), environ)


def to_argv(values: Mapping[str, object]) -> list[str]:
    """Parsed option values -> the arguments that give them to the page (after `streamlit run SCRIPT --`)."""
    argv = []
    for key in ENV:
        value = values.get(key)
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv
