"""Policies that read step reports and decide how to rebalance the pipeline.

Every controller answers one question per step: given the latest ``StepReport`` and the current
``Plan`` (partition, micro-batches, schedule), what should change before the next step? The
answer is an ``adaptive_pp.decisions.Decision``: ``Keep``, ``SetMicrobatches``, ``MoveLayers``
or ``SetSchedule``. Controllers are pure Python (no torch.distributed) and deterministic: the same
reports in the same order give the same decisions.

Built in:

- ``Rebalancer``: moves boundary layers between neighbours when stage times are uneven; its
  ``CostModel`` tells a slow device (cost stays with the stage) from costlier layers (cost
  travels with the layer). A move's cost counts each layer's bytes as the step reports
  measure them (``StageStats.layer_bytes``) unless ``RebalancerConfig.bytes_per_layer`` is set.
- ``MicrobatchTuner``: raises M while the bubble is large and keeps only changes that help; M
  divides the batch size: ``TunerConfig.global_batch``, or else the reports' ``StepReport.batch``.
- ``ScheduleSwitcher``: switches to a schedule the simulator predicts faster (1F1B <-> ZB-H1 by
  default; ``SwitchConfig``) if its activation stash fits, and keeps it only if steps got faster.
- ``AdaptivePolicy``: the three together (the tuner only if given a ``TunerConfig``), at most
  one decision a step; ``Hold``: never changes anything (adaptivity off).
- ``default_policy()``: what ``PipelineConfig(adaptive=True)`` runs: ``AdaptivePolicy`` with the
  rebalancer, the tuner and the switcher all on, each with its default config. It takes no
  arguments: what is model-specific (layer bytes, batch size, layer times, device speeds) comes
  from the step reports. After a skew (a device 1.1-3x slower, layers 1.1-3x costlier, MoE-like
  skew) it reaches a plan within 5% of the best split within 5 steps of the first report that
  shows it, and 5% noise alone never moves a layer: ``tests/test_controllers_loop.py`` holds
  it to that in the closed-loop harness (``controllers.harness``).

Plugging in your own controller: pass any object with these three methods (``Controller`` is
a ``typing.Protocol``, so no subclassing is needed)::

    class EveryHundredSteps:
        def __init__(self) -> None:
            self.steps = 0

        def decide(self, report: StepReport, plan: Plan) -> Decision:
            self.steps += 1
            return SetMicrobatches(8) if self.steps == 100 else Keep()

        def state_dict(self) -> dict[str, Any]:
            return {"steps": self.steps}

        def load_state_dict(self, state: Mapping[str, Any]) -> None:
            self.steps = int(state["steps"])

``decide`` runs on one rank with the gathered report; the runtime validates the decision with
``adaptive_pp.decisions.apply`` (and simulates the new plan) before every rank applies it at the
next step boundary, and refuses it (logging why) if it is invalid. ``state_dict`` must be
JSON-ready: it goes into checkpoints, and ``load_state_dict`` of a freshly built controller must
make it decide exactly as the saved one would have. ``controllers.harness`` runs a controller
in a closed loop against the simulator, to test it before it touches a real job.
"""

from .base import Controller, Hold, Proposal, busiest_bubble, imbalance
from .costmodel import CostModel
from .estimates import LayerEstimator, measured_layers, predict_step_time
from .policy import AdaptivePolicy, default_policy
from .rebalancer import Rebalancer, RebalancerConfig
from .schedule import ScheduleSwitcher, SwitchConfig
from .search import near_balanced, nudges, route, single_moves
from .tuner import MicrobatchTuner, TunerConfig

__all__ = [
    "AdaptivePolicy",
    "Controller",
    "CostModel",
    "Hold",
    "LayerEstimator",
    "MicrobatchTuner",
    "Proposal",
    "Rebalancer",
    "RebalancerConfig",
    "ScheduleSwitcher",
    "SwitchConfig",
    "TunerConfig",
    "busiest_bubble",
    "default_policy",
    "imbalance",
    "measured_layers",
    "near_balanced",
    "nudges",
    "predict_step_time",
    "route",
    "single_moves",
]
