"""Errors the runtime raises; each names the stage and, where it applies, the micro-batch.

A step either completes on every rank or fails on every rank: the rank where a failure starts
raises it and tells the others, which raise an error of the same class with the same message
and ``remote=True`` (see adaptive_pp.control). ``undone`` says whether the step was undone on
every rank (the pipeline is usable, the next step is correct) or left the stages inconsistent
(the pipeline is poisoned: later steps raise PipelinePoisoned until a checkpoint is loaded).
"""

from __future__ import annotations

from typing import Any


class PipelineError(RuntimeError):
    """A pipeline step failed; ``stage``, ``peer``, ``microbatch``, ``layer`` say where."""

    def __init__(
        self,
        message: str,
        *,
        stage: int | None = None,
        peer: int | None = None,
        microbatch: int | None = None,
        layer: int | None = None,
    ) -> None:
        super().__init__(message)
        self.stage, self.peer, self.microbatch, self.layer = stage, peer, microbatch, layer
        #: Raised here because another stage failed (that stage raised the original).
        self.remote = False
        #: The step was undone on every rank: parameters, optimizer, gradients, RNG as before.
        self.undone = False


class PeerGone(PipelineError):
    """A neighbouring stage died or closed its link while this stage waited on it."""


class StageFrozen(PeerGone):
    """A stage sent no heartbeat for ``PipelineConfig.heartbeat_timeout`` (``peer`` names it)."""


class PipelineTimeout(PipelineError):
    """A receive waited longer than the configured timeout (a stuck peer)."""


class VersionMismatch(PipelineError):
    """A message was computed with other weights than the receiver expects."""


class StageFailure(PipelineError):
    """User code (a layer, the loss) raised inside a stage."""


class NonFiniteLoss(PipelineError):
    """The loss of a micro-batch is NaN or infinite."""


class BatchError(PipelineError, ValueError):
    """The inputs or targets given to ``step()`` do not fit (size, M, missing)."""


class DecisionMismatch(PipelineError, ValueError):
    """The ranks were asked to apply different decisions (or hold different plans)."""


class PipelinePoisoned(PipelineError):
    """An earlier step failed part-way: the stages no longer hold one consistent model."""


_CLASSES: dict[str, type[PipelineError]] = {
    c.__name__: c
    for c in (
        PipelineError,
        PeerGone,
        StageFrozen,
        PipelineTimeout,
        VersionMismatch,
        StageFailure,
        NonFiniteLoss,
        BatchError,
        DecisionMismatch,
        PipelinePoisoned,
    )
}
_FIELDS = ("stage", "peer", "microbatch", "layer")
for _cls in _CLASSES.values():
    _cls.__module__ = "adaptive_pp.errors"  # the public path (tracebacks, spans, pickles)


def describe(exc: BaseException) -> dict[str, Any]:
    """``exc`` as JSON-ready data that ``rebuild`` turns back into an error on another rank."""
    out: dict[str, Any] = {"kind": type(exc).__name__, "message": str(exc)}
    for name in _FIELDS:
        out[name] = getattr(exc, name, None)
    return out


def rebuild(data: dict[str, Any], *, undone: bool) -> PipelineError:
    """The error another rank described, of the same class where it is one of ours."""
    cls = _CLASSES.get(data["kind"], PipelineError)
    message = data["message"] if cls is not PipelineError else f"{data['kind']}: {data['message']}"
    exc = cls(message, **{name: data.get(name) for name in _FIELDS})
    exc.remote, exc.undone = True, undone
    return exc
