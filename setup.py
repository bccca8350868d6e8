"""Packaging beyond pyproject.toml: the repository's configs/ (experiments and DeepSpeed files)
ships inside the package as ``iais_scale/configs``, so that an installed wheel resolves
``--config demo`` and ``deepspeed_config: zero2`` without a checkout."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["iais_scale*", "data_tools*"]), "iais_scale.configs",
              "iais_scale.configs.deepspeed"],
    package_dir={"iais_scale.configs": "configs"},
    package_data={"iais_scale.configs": ["*.yaml"], "iais_scale.configs.deepspeed": ["*.json"]},
)
