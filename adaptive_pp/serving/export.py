"""Export a partitioned model as one ONNX file per stage, each checked against PyTorch.

The model is what ``Pipeline`` takes: an ``nn.Sequential`` (or list of blocks) plus optional
``pre`` (first stage) and ``post`` (last stage). Stage ``s`` is ``pre? + blocks[a:b] + post?``
for the partition's range ``[a, b)``, exported with ``torch.onnx.export`` (the TorchScript
exporter, ``dynamo=False``) with a dynamic batch dimension. Each stage is then run by
onnxruntime on the random batch chained through the earlier stages, at two batch sizes, and
must match the PyTorch stage within ``rtol``/``atol`` (``numpy.allclose``); otherwise
``ExportMismatch`` names the stage and the largest error.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from ..core.partition import Partition
from .manifest import INPUT_NAME, OUTPUT_NAME, Manifest, StageSpec, TensorSpec, random_input

#: default tolerance of the export check (float32): |ort - torch| <= ATOL + RTOL * |torch|
RTOL, ATOL = 1e-4, 1e-5
OPSET = 17


class ExportMismatch(AssertionError):
    """An exported stage whose onnxruntime output differs from PyTorch's beyond tolerance."""


def stage_modules(
    model: nn.Sequential | Sequence[nn.Module],
    partition: Partition | Sequence[int],
    *,
    pre: nn.Module | None = None,
    post: nn.Module | None = None,
) -> list[nn.Sequential]:
    """Stage ``s``'s modules in order (``pre`` first on stage 0, ``post`` last on the last)."""
    blocks = list(model)
    part = partition if isinstance(partition, Partition) else Partition(tuple(partition))
    if part.num_layers != len(blocks):
        raise ValueError(
            f"partition {part.bounds} covers {part.num_layers} layers; the model has {len(blocks)}"
        )
    out = []
    for s in range(part.num_stages):
        mods = list(blocks[part.bounds[s] : part.bounds[s + 1]])
        if s == 0 and pre is not None:
            mods.insert(0, pre)
        if s == part.num_stages - 1 and post is not None:
            mods.append(post)
        out.append(nn.Sequential(*mods).eval())
    return out


def demo_mlp(width: int = 256, layers: int = 10) -> nn.Sequential:
    """A ``layers``-block MLP (Linear + ReLU blocks, a plain Linear last), ``width`` wide."""
    blocks: list[nn.Module] = [
        nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers - 1)
    ]
    blocks.append(nn.Linear(width, width))
    return nn.Sequential(*blocks)


def _run_torch(module: nn.Module, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    with torch.no_grad():
        y = module(torch.from_numpy(np.ascontiguousarray(x)))
    return np.asarray(y.detach().cpu().numpy())


def _export(module: nn.Module, example: npt.NDArray[Any], path: Path, opset: int) -> None:
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.from_numpy(np.ascontiguousarray(example)),),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
        )


def check_stage(
    path: str | Path,
    module: nn.Module,
    inputs: Sequence[npt.NDArray[Any]],
    *,
    stage: int,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> float:
    """Run the ONNX file and the module on each input; the largest abs error, or ExportMismatch."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in inputs:
        want = _run_torch(module, x)
        got = np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
        if got.shape != want.shape:
            raise ExportMismatch(
                f"stage {stage}: onnxruntime output shape {got.shape} != PyTorch {want.shape} "
                f"for a batch of {x.shape[0]}"
            )
        err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
        worst = max(worst, err)
        if not np.allclose(got, want, rtol=rtol, atol=atol):
            raise ExportMismatch(
                f"stage {stage} ({path}): onnxruntime differs from PyTorch by up to {err:.3g} "
                f"on a batch of {x.shape[0]} (tolerance rtol={rtol:g}, atol={atol:g})"
            )
    return worst


def export_pipeline(
    model: nn.Sequential | Sequence[nn.Module],
    partition: Partition | Sequence[int],
    sample_shape: Sequence[int],
    out_dir: str | Path,
    *,
    pre: nn.Module | None = None,
    post: nn.Module | None = None,
    dtype: str = "float32",
    input_high: int = 2,
    check_batch: int = 8,
    rtol: float = RTOL,
    atol: float = ATOL,
    seed: int = 0,
    opset: int = OPSET,
) -> Manifest:
    """Write ``stageN.onnx`` per stage, the reference batch and ``manifest.json``; check each.

    ``sample_shape`` is one sample's input shape (without the batch dimension), ``dtype`` the
    input's dtype (integer inputs, e.g. token ids for an embedding ``pre``, are drawn in
    ``[0, input_high)``). Each stage is checked at batch sizes ``check_batch`` and 3.
    """
    part = partition if isinstance(partition, Partition) else Partition(tuple(partition))
    modules = stage_modules(model, part, pre=pre, post=post)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = random_input(check_batch, sample_shape, dtype, high=input_high, seed=seed)
    small = x[:3]
    reference_input = x
    specs = []
    for s, module in enumerate(modules):
        path = out / f"stage{s}.onnx"
        _export(module, x, path, opset)
        err = check_stage(path, module, [x, small], stage=s, rtol=rtol, atol=atol)
        y, y_small = _run_torch(module, x), _run_torch(module, small)
        specs.append(
            StageSpec(
                stage=s,
                file=path.name,
                layers=(part.bounds[s], part.bounds[s + 1]),
                pre=s == 0 and pre is not None,
                post=s == len(modules) - 1 and post is not None,
                input=TensorSpec((None, *x.shape[1:]), x.dtype.name),
                output=TensorSpec((None, *y.shape[1:]), y.dtype.name),
                max_error=err,
            )
        )
        x, small = y, y_small
    manifest = Manifest(part.bounds, tuple(specs), rtol, atol, input_high)
    np.save(out / manifest.reference_input, reference_input, allow_pickle=False)
    np.save(out / manifest.reference_output, x, allow_pickle=False)
    manifest.save(out)
    return manifest
