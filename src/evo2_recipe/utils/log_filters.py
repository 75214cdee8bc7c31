"""Default-verbosity log hygiene: our lines and real warnings, not dependency chatter.

Some dependencies reset their own logger level and attach their own handler when imported
(``megatron.bridge.utils.import_utils`` logs a traceback for every optional import it probes), so a filter on the
logger object - which survives both - is what silences them. :func:`quiet_dependency_logs` must run before megatron
is imported; nothing here runs at import time.
"""

from __future__ import annotations

import logging
import warnings

_CHATTY = ("megatron.bridge.utils.import_utils", "megatron.bridge.models", "megatron.core.models.mimo",
           "megatron.core.msc_utils", "megatron.core.distributed.fsdp", "torch.distributed", "TransformerEngine",
           "transformer_engine", "modelopt")
# Warnings that describe this machine, not a problem: CPU runs have no CUDA runtime.
_EXPECTED = ("No CUDA runtime is found",)


class DependencyNoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and record.name.startswith(_CHATTY):
            return False
        return not str(record.msg).startswith(_EXPECTED)


_FILTER = DependencyNoiseFilter()


def quiet_dependency_logs() -> None:
    for name in (*_CHATTY, "torch.utils.cpp_extension"):
        logging.getLogger(name).addFilter(_FILTER)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_FILTER)
    # Import-time notices about optional accelerators (TE, Apex) and deprecations inside dependencies.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(megatron|torch)\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch)\..*")
    # TE probes for a JAX build and modelopt for its Triton plugin at import; neither is used here.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"transformer_engine(\..*)?")
    warnings.filterwarnings("ignore", message=r"Failed to import modelopt triton plugin")


def dependency_logs_quiet() -> bool:
    """Whether :func:`quiet_dependency_logs` is in effect in this process (spawned workers inherit it)."""
    return _FILTER in logging.getLogger(_CHATTY[0]).filters
