"""selfy_hf: SELFY video action recognition (ICCV 2021) as Hugging Face transformers models.

Importing the package registers the config, the models and the video processor with the Auto classes, and marks
them so that `save_pretrained` writes their code next to the weights (`trust_remote_code` loading without this
package installed).
"""

from transformers import AutoConfig, AutoModel, AutoModelForVideoClassification, AutoVideoProcessor

from .configuration_selfy import PRESETS, SelfyConfig
from .modeling_selfy import SelfyForVideoClassification, SelfyModel, SelfyPreTrainedModel
from .video_processing_selfy import SelfyVideoProcessor

AutoConfig.register(SelfyConfig.model_type, SelfyConfig, exist_ok=True)
AutoModel.register(SelfyConfig, SelfyModel, exist_ok=True)
AutoModelForVideoClassification.register(SelfyConfig, SelfyForVideoClassification, exist_ok=True)
AutoVideoProcessor.register(SelfyConfig, SelfyVideoProcessor, exist_ok=True)

SelfyConfig.register_for_auto_class()
SelfyModel.register_for_auto_class("AutoModel")
SelfyForVideoClassification.register_for_auto_class("AutoModelForVideoClassification")
SelfyVideoProcessor.register_for_auto_class("AutoVideoProcessor")

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "SelfyConfig",
    "SelfyForVideoClassification",
    "SelfyModel",
    "SelfyPreTrainedModel",
    "SelfyVideoProcessor",
]
