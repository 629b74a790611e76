"""qlora-kit: QLoRA fine-tuning on the Hugging Face stack from one YAML recipe."""

__version__ = "0.1.0"

import logging

# bitsandbytes warns at import time on CPUs without an optional downloadable kernel; results are unaffected.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
