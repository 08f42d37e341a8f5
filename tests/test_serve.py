"""Serving: wire frames, ONNX export equality, served equality, errors that name the stage.

The stage servers here run in this process (threads), which is fast; tests/test_serve_processes.py
runs them as real processes and kills one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
grpc = pytest.importorskip("grpc")
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from adaptive_pp.observability.chrome_trace import chrome_trace, load_run  # noqa: E402
from adaptive_pp.serving import wire  # noqa: E402
from adaptive_pp.serving.client import PipelineClient, StageError  # noqa: E402
from adaptive_pp.serving.export import ExportMismatch, check_stage, export_pipeline  # noqa: E402
from adaptive_pp.serving.manifest import TensorSpec, load_manifest, load_reference  # noqa: E402
from adaptive_pp.serving.reporting import RunDir  # noqa: E402
from adaptive_pp.serving.server import FORWARD, start_server  # noqa: E402

WIDTH = 16


def make_model() -> tuple[nn.Sequential, nn.Module, nn.Module]:
    torch.manual_seed(0)
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(4)])
    return blocks, nn.Linear(8, WIDTH), nn.Linear(WIDTH, 3)


def reference(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    blocks, pre, post = make_model()
    with torch.no_grad():
        return np.asarray(post(blocks(pre(torch.from_numpy(x)))).numpy())


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    blocks, pre, post = make_model()
    out = tmp_path_factory.mktemp("export")
    export_pipeline(blocks, (0, 1, 4), (8,), out, pre=pre, post=post)
    return out


class InProcess:
    """Every stage's server in this process, last first; ``stop(s)`` takes one down."""

    def __init__(self, export_dir: Path, delays: tuple[float, ...] = (0.0, 0.0)) -> None:
        self.servers: list[Any] = []
        self.addresses: list[str] = []
        nxt = None
        for s in reversed(range(len(delays))):
            server, service, address = start_server(
                export_dir, s, next_address=nxt, delay=delays[s], max_workers=16
            )
            self.servers.insert(0, (server, service))
            self.addresses.insert(0, address)
            nxt = address

    def stop(self, stage: int) -> None:
        server, service = self.servers[stage]
        server.stop(grace=None).wait()
        service.close()
        service.worker.close()

    def close(self) -> None:
        for s in range(len(self.servers)):
            self.stop(s)


@pytest.fixture(scope="module")
def pipeline(export_dir: Path) -> Iterator[InProcess]:
    p = InProcess(export_dir)
    yield p
    p.close()


@pytest.fixture
def client(pipeline: InProcess, export_dir: Path) -> Iterator[PipelineClient]:
    partition = load_manifest(export_dir).partition
    with PipelineClient(pipeline.addresses, partition=partition, timeout=5.0) as c:
        yield c


# -- frames ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "uint8", "bool", "float16"])
def test_frame_round_trip(dtype: str) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    frame = wire.Frame(7, 3, arr, ((0, 1.5, 2.0, 2.5),))
    back = wire.unpack(wire.pack(frame))
    assert (back.request, back.microbatch, back.timings) == (7, 3, frame.timings)
    assert back.array.dtype == arr.dtype and back.array.shape == arr.shape
    assert np.array_equal(back.array, arr)


def test_malformed_frames_are_refused() -> None:
    good = wire.pack(wire.Frame(0, 0, np.zeros((2, 3), np.float32)))
    with pytest.raises(wire.WireError, match="payload has 20 bytes; shape \\(2, 3\\)"):
        wire.unpack(good[:-4])
    with pytest.raises(wire.WireError, match="not an adaptive-pp frame"):
        wire.unpack(b"PKL0" + good[4:])
    with pytest.raises(wire.WireError, match="header"):
        wire.unpack(good[:12] + b"{" * (len(good) - 12))
    bad = good.replace(b'"float32"', b'"object!"')
    with pytest.raises(wire.WireError, match="dtype 'object!' is not supported"):
        wire.unpack(bad)
    with pytest.raises(wire.WireError, match="cannot travel"):
        wire.pack(wire.Frame(0, 0, np.zeros(2, np.complex64)))


def test_tensor_spec_says_what_does_not_fit() -> None:
    spec = TensorSpec((None, 8), "float32")
    assert spec.problem(np.zeros((5, 8), np.float32)) is None
    assert spec.problem(np.zeros((5, 8), np.float64)) == (
        "input has shape (5, 8) float64; expected (batch, 8) float32"
    )
    assert spec.problem(np.zeros((5,), np.float32)) is not None
    assert spec.problem(np.zeros((5, 7), np.float32)) is not None


# -- export ---------------------------------------------------------------------------------


def test_export_stages_equal_pytorch(export_dir: Path) -> None:
    import onnxruntime as ort

    man = load_manifest(export_dir)
    assert man.partition == (0, 1, 4) and man.num_stages == 2
    assert [s.pre for s in man.stages] == [True, False]
    assert [s.post for s in man.stages] == [False, True]
    assert man.stages[0].input == TensorSpec((None, 8), "float32")
    assert man.stages[1].output == TensorSpec((None, 3), "float32")
    # a fresh batch of another size, chained through the ONNX stages, equals the model
    x = np.random.default_rng(5).standard_normal((13, 8)).astype(np.float32)
    y = x
    for st in man.stages:
        sess = ort.InferenceSession(str(export_dir / st.file), providers=["CPUExecutionProvider"])
        y = sess.run(["output"], {"input": y})[0]
    np.testing.assert_allclose(y, reference(x), rtol=man.rtol, atol=man.atol)
    ref_x, ref_y = load_reference(export_dir)
    np.testing.assert_allclose(ref_y, reference(ref_x), rtol=0, atol=0)


def test_export_check_catches_a_wrong_stage(export_dir: Path) -> None:
    blocks, pre, _ = make_model()
    wrong = nn.Sequential(pre, blocks[0], nn.Tanh())  # stage 0 with one extra activation
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(ExportMismatch, match=r"stage 0 .* differs from PyTorch"):
        check_stage(export_dir / "stage0.onnx", wrong, [x], stage=0)


def test_export_with_an_embedding_takes_integer_inputs(tmp_path: Path) -> None:
    torch.manual_seed(1)
    blocks = [nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6)]
    man = export_pipeline(
        blocks, (0, 2, 3), (5,), tmp_path, pre=nn.Embedding(11, 6), dtype="int64", input_high=11
    )
    assert man.stages[0].input == TensorSpec((None, 5), "int64")
    assert man.stages[1].output == TensorSpec((None, 5, 6), "float32")


# -- served ---------------------------------------------------------------------------------


@pytest.mark.parametrize("microbatches", [1, 3, 8])
def test_served_output_equals_pytorch(
    client: PipelineClient, export_dir: Path, microbatches: int
) -> None:
    x = np.random.default_rng(microbatches).standard_normal((10, 8)).astype(np.float32)
    man = load_manifest(export_dir)
    result = client.infer(x, microbatches)
    np.testing.assert_allclose(result.output, reference(x), rtol=man.rtol, atol=man.atol)
    r = result.report
    assert (r.microbatches, r.batch, r.partition, r.source) == (
        microbatches,
        10,
        (0, 1, 4),
        "serve",
    )
    for s in range(2):
        assert sorted(t.microbatch for t in r.timeline.stage(s)) == list(range(microbatches))
        assert all(t.kind == "F" and 0 <= t.start <= t.end <= r.step_time for t in r.timeline)
        q = r.queue(s - 1, s)
        assert all(a <= c for a, c in zip(q.arrived, q.consumed))
    assert len(result.latencies) == microbatches and all(x > 0 for x in result.latencies)
    assert all(0 < st.compute < st.wall for st in r.stages)
    assert 0 < r.bubble_fraction < 1


def test_bad_input_is_refused_naming_the_stage_and_servers_keep_serving(
    client: PipelineClient,
) -> None:
    x = np.ones((4, 8), np.float32)
    with pytest.raises(
        StageError, match=r"stage 0: .*\(2, 8\) float64; expected \(batch, 8\)"
    ) as e:
        client.infer(x.astype(np.float64), 2)
    assert (e.value.stage, e.value.code) == (0, "INVALID_ARGUMENT")
    with pytest.raises(StageError, match=r"stage 0: .*shape \(4, 7\) float32"):
        client.infer(np.ones((4, 7), np.float32), 1)
    with pytest.raises(StageError, match=r"stage 0: .*shape \(4,\) float32"):
        client.infer(np.ones(4, np.float32), 1)
    # raw garbage on the wire, straight to stage 0
    with grpc.insecure_channel(client.addresses[0]) as ch:
        with pytest.raises(grpc.RpcError) as raw:
            ch.unary_unary(FORWARD)(b"\x80\x04not a frame", timeout=2)
        assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "stage 0: " in raw.value.details()
    good = client.infer(x, 2)
    np.testing.assert_allclose(good.output, reference(x), rtol=1e-4, atol=1e-5)
    assert all(h["ready"] and h["failed"] == 0 for h in client.health())


def test_serve_run_dir_plots_and_traces(client: PipelineClient, tmp_path: Path) -> None:
    from adaptive_pp.serving.sweep import serve_requests

    run = RunDir(tmp_path / "run")
    x = np.zeros((8, 8), np.float32)
    reports = serve_requests(client, lambda i: x, 4, 3, warmup=1, run=run)
    loaded = load_run(run.path)
    as_json = [json.loads(json.dumps(r.to_dict())) for r in (*loaded, *reports)]
    assert as_json[:3] == as_json[3:]
    trace = chrome_trace(loaded)
    forwards = [e for e in trace["traceEvents"] if e.get("cat") == "forward"]
    assert len(forwards) == 3 * 2 * 4
    pytest.importorskip("matplotlib")
    from adaptive_pp.observability.plots import plot_run

    names = sorted(p.name for p in plot_run(run.path))
    assert names[0].startswith("queue-depth") and "trace.json" in names


def test_a_slow_stage_is_named_within_the_deadline(export_dir: Path) -> None:
    slow = InProcess(export_dir, delays=(0.0, 1.0))
    try:
        with PipelineClient(slow.addresses, timeout=0.5) as c:
            t0 = time.monotonic()
            with pytest.raises(StageError, match="stage 1 is too slow: micro-batch 0") as e:
                c.infer(np.zeros((2, 8), np.float32), 1)
            assert time.monotonic() - t0 < 1.0
            assert (e.value.stage, e.value.code) == (1, "DEADLINE_EXCEEDED")
    finally:
        slow.close()


def test_a_stage_that_is_down_is_named(export_dir: Path) -> None:
    p = InProcess(export_dir)
    try:
        with PipelineClient(p.addresses, timeout=5.0, health_timeout=0.5) as c:
            c.infer(np.zeros((2, 8), np.float32), 2)
            p.stop(1)
            t0 = time.monotonic()
            with pytest.raises(StageError, match=r"stage 1 \(127.0.0.1:\d+\) is unreachable") as e:
                c.infer(np.zeros((2, 8), np.float32), 2)
            assert e.value.stage == 1 and time.monotonic() - t0 < 3
            with pytest.raises(StageError, match=r"stage 1 .* does not answer a health check"):
                c.health()
    finally:
        p.stop(0)


def test_servers_and_client_import_without_torch() -> None:
    """A stage server process starts without torch (fast, small); the CLI without grpc."""
    import subprocess
    import sys

    code = (
        "import sys, adaptive_pp.serving.server, adaptive_pp.serving.client, "
        "adaptive_pp.serving.launch\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch'}))\n"
        "import adaptive_pp.cli; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "ok"]
    code = "import sys, adaptive_pp.cli; print(sorted({'grpc', 'onnxruntime'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
