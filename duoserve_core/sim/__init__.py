"""The simulator: the real policies and expert cache replayed on a calibrated timing model.

``python -m duoserve_core.sim`` (see ``__main__``) answers "what would this policy do at this
scale" from a routing trace and a device calibration (``python -m duoserve_core.calibrate``).
Modules, one job each: ``calibration`` (the file and its terms), ``sim_model`` (config and memory plan,
no weights), ``simulator`` (the discrete-event model), ``runner`` (the real benchmark's figures),
``reference`` (Belady / LRU / LFU at every budget), ``qos`` (arrivals, percentiles, SLOs), ``serving``
(batches and arrivals through the runtime's batcher, in the bench's row fields).
"""

from .runner import simulate
from .calibration import Calibration, CalibrationError, load_calibration
from .simulator import Simulator, SimTimeline
from .sim_model import SimModel, build_model

__all__ = ["Calibration", "CalibrationError", "SimModel", "SimTimeline", "Simulator", "build_model",
           "load_calibration", "simulate"]
