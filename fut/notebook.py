"""The setup every stage notebook runs first, under DVC (papermill, from the project root) and in JupyterLab
(whose kernel starts in notebooks/): params and data paths in the notebooks are relative to the project root.

Import this module before fut's other modules: tqdm.auto (imported by them, and by datasets and transformers)
probes for ipywidgets at its first import and, in a kernel without them, warns into the notebook ("IProgress
not found", with this environment's path) before falling back to tqdm.std's plain-text bars. Importing it
here first with that warning silenced keeps the plain-text bars and drops the warning.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import seaborn as sns
from tqdm import TqdmWarning

from . import config

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TqdmWarning)
    import tqdm.auto  # noqa: F401

log = logging.getLogger(__name__)

PROJECT_MARKER = "dvc.yaml"


def project_root(start: Path) -> Path:
    """The nearest folder at or above `start` holding dvc.yaml."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if (folder / PROJECT_MARKER).is_file():
            return folder
    raise FileNotFoundError(f"no {PROJECT_MARKER} in {start} or above it: this notebook is not inside the project")


def setup(params_file: str | Path, figures_dir: str | Path, plots_dir: str | Path) -> config.Params:
    """Work from the project root, log at INFO, theme seaborn, create the figure and plot folders; the params."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    here = Path.cwd()
    root = project_root(here)
    if root != here.resolve():
        os.chdir(root)
        log.info("working directory %s -> %s (the project root, which the notebook's paths are relative to)",
                 here, root)
    sns.set_theme(style="whitegrid")
    np.random.seed(0)   # seaborn's jitter draws from numpy's global generator
    for folder in (figures_dir, plots_dir):
        Path(folder).mkdir(parents=True, exist_ok=True)
    return config.load(params_file)
