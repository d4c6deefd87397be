"""Publishing a hybrid: a model card, remote code that loads with only torch and transformers, and the upload."""
