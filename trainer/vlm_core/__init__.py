"""The torch-free core both sides import: the `VLMTrainingJob` schema, the table of stage kinds, the
operator-trainer contract, the storage layer, validators, redaction, model-config reading and the
FLOP/memory accounting.

Arrows (import-linter, pyproject.toml): vlm_operator -> vlm_core <- vlm_trainer <- vlm_quickstart.
Nothing here imports torch, transformers, kopf or kubernetes, nor the packages above it.
"""

# The one place the version is written: pyproject.toml reads it (setuptools dynamic version), the
# trainer image tag defaults to it (schema ImageSpec), and a test holds the Helm chart's to it.
__version__ = "0.1.0"
