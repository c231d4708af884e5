"""Package discovery only; everything else is declared in pyproject.toml.

pyproject's ``[tool.setuptools.packages.find]`` cannot name a package whose folder lies outside the tree it searches,
and the configs stay in the repository's top-level ``configs/`` while shipping as ``densevision.configs``
(``package-dir`` in pyproject). So the packages are found here: every package under ``densevision/`` (new ones
included without editing this file) plus ``configs/`` and its sub-folders under the name ``densevision.configs``.
"""

from setuptools import find_namespace_packages, setup

packages = find_namespace_packages(include=["densevision", "densevision.*"], exclude=["*.__pycache__"])
configs = find_namespace_packages(where="configs", exclude=["*.__pycache__", "__pycache__"])
setup(packages=[*packages, "densevision.configs", *(f"densevision.configs.{p}" for p in configs)])
