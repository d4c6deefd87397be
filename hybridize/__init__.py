"""hybridize: turn a pretrained Hugging Face Llama into an attention / Mamba2 / Gated DeltaNet hybrid."""

__version__ = "0.1.0"
