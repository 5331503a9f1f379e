"""Build CLIP-Fed's server dataset offline (``python -m data_synth build|inspect``).

CLIP-Fed's server never sees a client sample: it synthesises its own dataset and widens its trigger
coverage with frequency-domain variants (arXiv 2508.10315; docs/architecture.md, method.md section 4).
Pipeline: a pluggable generator (``teacher-inversion``, ``folder``, ``mllm``) -> teacher filter
(argmax == intended class and prob >= min_conf) -> class re-balancing -> frequency augmentation
(``clipfed_strategy.freq_augment``) -> atomic save in the ``ServerDataset`` format.
"""

from .build import build_server_dataset, resolve_device
from .classes import CLASS_LISTS, resolve_class_names
from .errors import SynthError

__all__ = ["CLASS_LISTS", "SynthError", "build_server_dataset", "resolve_class_names", "resolve_device"]
