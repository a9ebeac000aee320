"""Learning: which recovery works best, and when a dependency's behaviour is anomalous.

``StrategyLearner`` and the anomaly event types are importable from here without statsmodels;
the statsmodels-backed detector lives in :mod:`otel_recovery.learning.anomaly` (the ``anomaly``
extra) and is imported only when you import that module.
"""

from otel_recovery.learning._events import AnomalyBus, AnomalyEvent, SeriesKey

__all__ = ["AnomalyBus", "AnomalyEvent", "SeriesKey"]
