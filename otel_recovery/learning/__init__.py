"""Learning: which recovery works best, and when a dependency's behaviour is anomalous.

``StrategyLearner``, ``AdaptiveThresholds`` and the anomaly event types are importable from
here without statsmodels; the statsmodels-backed detector lives in
:mod:`otel_recovery.learning.anomaly` (the ``anomaly`` extra) and is imported only when you
import that module.
"""

from otel_recovery.learning._backoff import LearnedBackoff, learned_retry
from otel_recovery.learning._decisions import DecisionKey, HardCaps, Recommendation, RewardWeights
from otel_recovery.learning._events import AnomalyBus, AnomalyEvent, SeriesKey
from otel_recovery.learning.adaptive import AdaptiveThresholds, Tightening
from otel_recovery.learning.advisor import LearnedRetryAdvisor
from otel_recovery.learning.store import CheckpointLearnerStore, LearnerStore, MemoryLearnerStore
from otel_recovery.learning.strategy import StrategyLearner

__all__ = [
    "AdaptiveThresholds",
    "AnomalyBus",
    "AnomalyEvent",
    "CheckpointLearnerStore",
    "DecisionKey",
    "HardCaps",
    "LearnedBackoff",
    "LearnedRetryAdvisor",
    "LearnerStore",
    "MemoryLearnerStore",
    "Recommendation",
    "RewardWeights",
    "SeriesKey",
    "StrategyLearner",
    "Tightening",
    "learned_retry",
]
