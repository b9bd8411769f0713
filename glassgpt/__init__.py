"""glassgpt: train, finetune and sample small GPTs, and trace what they generate back to the training data."""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glassgpt.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "__version__"]


def __getattr__(name: str):
    # PEP 562: `from glassgpt import GPT` still works, but importing any glassgpt module (the CLI,
    # config) no longer imports torch; `glassgpt --help` and span queries need no torch.
    if name in ("GPT", "GPTConfig"):
        from glassgpt import model

        return getattr(model, name)
    raise AttributeError(f"module 'glassgpt' has no attribute {name!r}")
