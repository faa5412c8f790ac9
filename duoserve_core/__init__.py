"""DuoServe core: an offloaded Mixtral runtime with phase-aware expert scheduling.

    import duoserve_core
    rt = duoserve_core.load("synthetic:tiny", device="cpu", memory_budget="4MiB")
    result = rt.generate(prompt_ids=[1, 2, 3], max_new_tokens=8)
"""

from .runtime import GenerationResult, Runtime, load
from .errors import BudgetError, CheckpointError, DeviceError, DuoServeError, PromptError

__all__ = ["BudgetError", "CheckpointError", "DeviceError", "DuoServeError", "GenerationResult", "PromptError",
           "Runtime", "load"]
__version__ = "0.1.0"
