"""hybridize: turn a pretrained Hugging Face Llama into an attention / Mamba2 / Gated DeltaNet hybrid."""

__version__ = "0.1.0"
# Exported model code checks this constant (and the version) before it uses the installed `hybridize`: another
# package with the same name must not run in the process of someone loading a hybrid (hybridize.publish.remote_code).
__hybridize_toolkit__ = "hybridize: Llama to attention / Mamba2 / Gated DeltaNet hybrids"

# Importing the package registers HybridConfig / HybridForCausalLM with the transformers Auto classes.
from . import model  # noqa: E402,F401
