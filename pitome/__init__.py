"""pitome: token merging for pretrained transformers, with PiToMe (NeurIPS 2024) and its baselines.

    import pitome
    pitome.patch(model, algo="pitome", ratio=0.9)
    pitome.unpatch(model)
"""

from __future__ import annotations

from . import algorithms as _algorithms  # noqa: F401  (fills the registry)
from . import llava  # noqa: F401  (pitome.llava: image-token counts, placeholder fitting)
from .adapters import supported_models
from .adapters.base import UnsupportedModelError
from .api import merge_config, merge_info, patch, pooling_weights, unpatch
from .core.registry import Algorithm, MergeContext, available_algorithms, register
from .runtime.state import MergeConfig, MergeInfo
from .tasks.finetune import evaluate_classifier, finetune
from .calibration import Calibration, calibrate  # noqa: E402  (uses the API above)

__version__ = "0.1.0"

__all__ = ["Algorithm", "Calibration", "MergeConfig", "MergeContext", "MergeInfo",
           "UnsupportedModelError", "available_algorithms", "calibrate", "merge_config",
           "merge_info", "patch", "pooling_weights", "register", "supported_models", "unpatch",
           "__version__"]
__all__ += ["evaluate_classifier", "finetune"]  # training through merging (docs/finetuning.md)
