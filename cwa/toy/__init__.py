"""The offline toy world: a synthetic language, tiny models trained on it, and task files.

``ensure_toy_model("gpt2" | "llama")`` returns a cached Hugging Face folder (trained on first
use, about a minute on a CPU), ``toy_data_path(name)`` a calibration / held-out text file or a
HellaSwag / LAMBADA schema task file, ``toy_info()`` what is cached where. Importing this package
does not import torch.
"""

from cwa.toy.cache import (
    DATA_FILES,
    ToyBuildError,
    build_toy_model,
    ensure_toy_data,
    ensure_toy_model,
    toy_cache_dir,
    toy_data_path,
    toy_info,
)
from cwa.toy.language import GENERATOR_VERSION
from cwa.toy.recipe import VARIANTS, ToyTrainConfig

__all__ = [
    "DATA_FILES",
    "GENERATOR_VERSION",
    "VARIANTS",
    "ToyBuildError",
    "ToyTrainConfig",
    "build_toy_model",
    "ensure_toy_data",
    "ensure_toy_model",
    "toy_cache_dir",
    "toy_data_path",
    "toy_info",
]
