"""glassgpt: train, finetune and sample small GPTs, and trace what they generate back to the training data."""

__version__ = "0.1.0"

from glassgpt.model import GPT, GPTConfig  # noqa: E402

__all__ = ["GPT", "GPTConfig", "__version__"]
