"""The trainer: what torchrun runs in each stage's processes (`python -m vlm_trainer --config <uri>`)."""

# The one place the version is written: pyproject.toml reads it (setuptools dynamic version), the
# trainer image tag defaults to it (spec.ImageSpec), and a test holds the Helm chart's to it.
__version__ = "0.1.0"
