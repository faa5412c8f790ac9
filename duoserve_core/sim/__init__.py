"""The simulator: the real policies and expert cache replayed on a calibrated timing model.

``python -m duoserve_core.sim`` (see ``__main__``) answers "what would this policy do at this
scale" from a routing trace and a device calibration (``python -m duoserve_core.calibrate``).
Modules, one job each: ``calibration`` (the file and its terms), ``model`` (config and memory plan,
no weights), ``engine`` (the discrete-event model), ``bench`` (the real benchmark's figures),
``reference`` (Belady / LRU / LFU at every budget), ``qos`` (arrivals, percentiles, SLOs).
"""

from .bench import simulate
from .calibration import Calibration, CalibrationError, load_calibration
from .engine import Simulator, SimTimeline
from .model import SimModel, build_model

__all__ = ["Calibration", "CalibrationError", "SimModel", "SimTimeline", "Simulator", "build_model",
           "load_calibration", "simulate"]
