"""What an export directory holds: ``manifest.json`` describing one ONNX file per stage.

Torch-free on purpose: the stage servers and the client read it without importing torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

MANIFEST = "manifest.json"
INPUT_NAME, OUTPUT_NAME = "input", "output"  # the ONNX graph's tensor names, every stage


@dataclass(frozen=True)
class TensorSpec:
    """A stage's input or output: dtype and shape, ``None`` for the (dynamic) batch dimension."""

    shape: tuple[int | None, ...]
    dtype: str

    def describe(self) -> str:
        """Text form such as ``(batch, 64) float32``."""
        dims = ", ".join("batch" if d is None else str(d) for d in self.shape)
        return f"({dims}{',' if len(self.shape) == 1 else ''}) {self.dtype}"

    def problem(self, array: npt.NDArray[Any]) -> str | None:
        """Why ``array`` does not fit this spec, or None if it does."""
        fits_shape = len(array.shape) == len(self.shape) and all(
            want is None or want == got for want, got in zip(self.shape, array.shape, strict=True)
        )
        if fits_shape and array.dtype.name == self.dtype:
            return None
        got = TensorSpec(tuple(int(d) for d in array.shape), array.dtype.name)
        return f"input has shape {got.describe()}; expected {self.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(tuple(None if d is None else int(d) for d in data["shape"]), str(data["dtype"]))


@dataclass(frozen=True)
class StageSpec:
    """One exported stage: its ONNX file, layers ``[first, end)``, pre/post, tensors, check."""

    stage: int
    file: str
    layers: tuple[int, int]
    pre: bool
    post: bool
    input: TensorSpec
    output: TensorSpec
    max_error: float
    """Largest |onnxruntime - PyTorch| seen when the export was checked."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "file": self.file,
            "layers": list(self.layers),
            "pre": self.pre,
            "post": self.post,
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "max_error": self.max_error,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageSpec:
        first, end = data["layers"]
        return cls(
            int(data["stage"]),
            str(data["file"]),
            (int(first), int(end)),
            bool(data["pre"]),
            bool(data["post"]),
            TensorSpec.from_dict(data["input"]),
            TensorSpec.from_dict(data["output"]),
            float(data["max_error"]),
        )


@dataclass(frozen=True)
class Manifest:
    """An exported pipeline: the partition, its stages and the tolerance they were checked at.

    ``reference_input`` / ``reference_output`` name .npy files (no pickle) with a random batch
    and the PyTorch model's output on it, for end-to-end checks of a served pipeline.
    """

    partition: tuple[int, ...]
    stages: tuple[StageSpec, ...]
    rtol: float
    atol: float
    input_high: int = 2
    """Integer inputs are drawn in ``[0, input_high)`` (token ids); unused for float inputs."""
    reference_input: str = "reference_input.npy"
    reference_output: str = "reference_output.npy"

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "partition": list(self.partition),
            "rtol": self.rtol,
            "atol": self.atol,
            "input_high": self.input_high,
            "reference_input": self.reference_input,
            "reference_output": self.reference_output,
            "stages": [s.to_dict() for s in self.stages],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            tuple(int(b) for b in data["partition"]),
            tuple(StageSpec.from_dict(s) for s in data["stages"]),
            float(data["rtol"]),
            float(data["atol"]),
            int(data.get("input_high", 2)),
            str(data.get("reference_input", "reference_input.npy")),
            str(data.get("reference_output", "reference_output.npy")),
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``manifest.json`` into ``folder``; returns its path."""
        path = Path(folder) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def load_manifest(folder: str | Path) -> Manifest:
    """The manifest of an export directory; ValueError naming the folder if there is none."""
    path = Path(folder) / MANIFEST
    try:
        return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ValueError(
            f"{folder}: no {MANIFEST}; export a model first (adaptive-pp export ...)"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is malformed: {exc}") from exc


def load_reference(folder: str | Path) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """The reference batch and PyTorch's output on it, from an export directory."""
    m = load_manifest(folder)
    root = Path(folder)
    x = np.load(root / m.reference_input, allow_pickle=False)
    y = np.load(root / m.reference_output, allow_pickle=False)
    return x, y


def random_input(
    batch: int,
    sample_shape: Sequence[int],
    dtype: str = "float32",
    *,
    high: int = 2,
    seed: int = 0,
) -> npt.NDArray[Any]:
    """A random batch: standard normal for float dtypes, integers in ``[0, high)`` otherwise."""
    rng = np.random.default_rng(seed)
    shape = (batch, *sample_shape)
    if np.issubdtype(np.dtype(dtype), np.floating):
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, high, size=shape).astype(dtype)
