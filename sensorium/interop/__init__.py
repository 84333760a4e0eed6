"""Converting sensorium backbones and adapters to and from other models' checkpoint layouts."""

from sensorium.interop.mllama import (
    MllamaConversionError,
    export_mllama,
    import_mllama,
    mllama_layer_mapping,
    mllama_media,
)

__all__ = ["MllamaConversionError", "export_mllama", "import_mllama", "mllama_layer_mapping", "mllama_media"]
