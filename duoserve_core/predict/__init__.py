"""DuoServe's decode-phase expert predictor: which experts the next layers will need.

    from duoserve_core.predict import load_predictor
    p = load_predictor("P.safetensors", expect=(model, num_layers, num_experts, top_k), device="cuda")
    probs = p.predict(layer, p.features(layer, experts, weights, prev_experts))  # [B, depth_at(layer), E]

Trained offline from activation traces (``python -m duoserve_core.predict train ...``); see
``features`` (the input encoding), ``layer_predictor`` (the MLPs and the file), ``baselines`` and
``evaluate`` (what it is compared with and how), ``latency`` (time per layer).
"""

from .errors import PredictorError
from .features import FeatureSpec, layer_features
from .layer_predictor import LayerPredictor, load_predictor, train_predictor

__all__ = ["FeatureSpec", "LayerPredictor", "PredictorError", "layer_features", "load_predictor", "train_predictor"]
