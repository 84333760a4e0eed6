"""Lightning modules, data modules and callbacks for training adapters and pretraining encoders."""

from sensorium.training.callbacks import AdapterExport, FlushDenormal
from sensorium.training.datamodules import ShardDataModule
from sensorium.training.modules import AdapterModule, ImageAdapterModule, VideoAdapterModule
from sensorium.training.pretrain import ImageEncoderPretrainModule
from sensorium.training.speech import SpeechAdapterModule, SpeechEncoderPretrainModule
from sensorium.training.stability import AdamInstabilityMonitor, TrainingInstabilityError

__all__ = [
    "AdamInstabilityMonitor",
    "AdapterExport",
    "AdapterModule",
    "FlushDenormal",
    "ImageAdapterModule",
    "ImageEncoderPretrainModule",
    "ShardDataModule",
    "SpeechAdapterModule",
    "SpeechEncoderPretrainModule",
    "TrainingInstabilityError",
    "VideoAdapterModule",
]
