"""The MLflow model, as "models from code": a model bundle behind MLflow's pyfunc API.

MLflow logs this file as the model's code (``tracking.log_model``) with the bundle
folder as the artifact ``bundle`` and the ``pipeline`` package beside it (``code_paths``),
so ``mlflow.pyfunc.load_model(URI).predict([...])`` and ``mlflow models serve -m URI``
work with MLflow, torch and tokenizers installed, without our package, and nothing is
unpickled: the weights are a state dict read with ``weights_only=True``, the rest JSON.

Input: one column of strings (a list, a Series, or a one-column DataFrame): source
sentences for a translation model; clip files for a captioning model (video files
decoded and sampled as in preprocessing, or ``.npy`` feature arrays). Output: one
string per input, in order. ``params``: ``beam_size``, ``length_penalty``, ``batch_size``
(and ``backbone`` for captioning: the TorchScript file of a model trained on frozen
features).
"""

from __future__ import annotations

import json
import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

# The inference params and their defaults, as in `pipeline translate` / `pipeline caption`.
TEXT_PARAMS: dict[str, Any] = {"beam_size": 4, "length_penalty": 0.6, "batch_size": 64}
VIDEO_PARAMS: dict[str, Any] = {"beam_size": 4, "length_penalty": 0.6, "batch_size": 32, "backbone": ""}


def signature(video: bool):
    """Strings in, strings out; one unnamed column each, so a plain list is valid input
    (a named column would make MLflow refuse ``predict(["a sentence"])``)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {int: "long", float: "double", str: "string"}
    params = VIDEO_PARAMS if video else TEXT_PARAMS
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in params.items()]),
    )


def column(model_input: Any) -> list[str]:
    """The strings of a list, a Series, a numpy array or a one-column DataFrame. Errors are
    MlflowException: the scoring server then answers 400 with the message."""
    import numpy as np

    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise MlflowException.invalid_parameter_value(
                f"expected one column of strings, got columns {list(model_input.columns)}"
            )
        model_input = model_input.iloc[:, 0]
    if isinstance(model_input, str):
        model_input = [model_input]
    if isinstance(model_input, (pd.Series, np.ndarray)):
        model_input = model_input.tolist()
    if not isinstance(model_input, list) or not all(isinstance(s, str) for s in model_input):
        raise MlflowException.invalid_parameter_value(f"expected a list of strings, got {type(model_input).__name__}")
    return model_input


class BundleModel(PythonModel):
    """A Translator or a Captioner, as the bundle's model.json says."""

    def load_context(self, context) -> None:
        import torch

        from pipeline.inference import BundleMeta, Captioner, Translator

        bundle = context.artifacts["bundle"]
        with open(os.path.join(bundle, "model.json")) as f:
            self.video = BundleMeta.from_json(json.load(f)).is_captioner
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = (Captioner if self.video else Translator).load(bundle, device)

    # pd.DataFrame: what MLflow hands over after checking the input against the signature
    # (a list becomes a one-column frame); as a hint it also tells MLflow to keep the
    # signature given at logging rather than infer one.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        # MLflow fills the signature's defaults in; the merge covers a caller passing some.
        p = {**(VIDEO_PARAMS if self.video else TEXT_PARAMS), **(params or {})}
        for key in ("beam_size", "batch_size"):
            if int(p[key]) < 1:
                raise MlflowException.invalid_parameter_value(f"params.{key} must be >= 1, got {p[key]}")
        items = column(model_input)
        if self.video:
            from pipeline.inference import BundleError

            try:
                clips = self.model.load_clips(items, p["backbone"])
            except (BundleError, OSError) as e:  # a missing clip, .npy for a frames model, no backbone
                raise MlflowException.invalid_parameter_value(str(e)) from e
            return self.model.caption(clips, int(p["beam_size"]), float(p["length_penalty"]), int(p["batch_size"]))
        return self.model.translate(items, int(p["beam_size"]), float(p["length_penalty"]), int(p["batch_size"]))


mlflow.models.set_model(BundleModel())
