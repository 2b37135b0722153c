"""Keep library chatter (progress bars of cache writes, deprecation notes) out of the user's terminal."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries(verbose: bool = False) -> None:
    """Silence datasets/transformers progress bars and known-harmless warnings unless verbose."""
    if verbose:
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    for name in ("bitsandbytes", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
