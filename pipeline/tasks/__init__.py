"""Tasks: a kind of data (sentence pairs, video clips with captions) and everything that
differs with it. :func:`task_for` is the one place that looks at which kind a config is."""

from __future__ import annotations

from typing import Any

from ..config import VIDEO_DATA
from ..data.output import Preprocessed
from .base import Task
from .captioning import CaptioningTask
from .translation import TranslationTask

TASKS: dict[str, type[Task]] = {"translation": TranslationTask, "captioning": CaptioningTask}

__all__ = ["TASKS", "CaptioningTask", "Task", "TranslationTask", "preprocess", "task_for"]


def task_for(cfg: Any) -> Task:
    """The task of a Config (or of its DataConfig): captioning for the video corpora."""
    data = getattr(cfg, "data", cfg)
    return TASKS["captioning" if data.name in VIDEO_DATA else "translation"]()


def preprocess(data_cfg: Any, force: bool = False) -> Preprocessed:
    """Run (or reuse) the preprocessing of ``data_cfg``'s task; returns (folder, manifest)."""
    return task_for(data_cfg).preprocess(data_cfg, force)
