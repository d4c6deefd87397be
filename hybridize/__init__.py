"""hybridize: turn a pretrained Hugging Face Llama into an attention / Mamba2 / Gated DeltaNet hybrid."""

__version__ = "0.1.0"

# Importing the package registers HybridConfig / HybridForCausalLM with the transformers Auto classes.
from . import model  # noqa: E402,F401
