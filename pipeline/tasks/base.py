"""What a kind of data decides, in one interface (see README, "Architecture").

A task is chosen once, from the config (:func:`pipeline.tasks.task_for`); the trainer, the
Ray Train loop, test decoding and the commands ask it instead of asking what the data is.
Everything heavy is imported inside the methods: ``pipeline config`` stays quick.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..data.output import Preprocessed
from ..data.tokenizer import Vocab


class Task:
    name: ClassVar[str]
    # The validation score that picks the best checkpoint and ranks sweep trials (the key of
    # :meth:`scores` with "val_" in front), and the scores logged at each validation.
    metric: ClassVar[str]
    val_scores: ClassVar[tuple[str, ...]]
    # Columns of a preprocessed split that evaluation and test decoding read.
    eval_columns: ClassVar[tuple[str, ...]]
    test_columns: ClassVar[tuple[str, ...]]
    test_batch_size: ClassVar[int]
    unit: ClassVar[str]  # what `pipeline evaluate` counts: sentences, videos
    digits: ClassVar[int]  # `pipeline evaluate` rounds its scores to this many digits

    # -- data ------------------------------------------------------------------------------
    def preprocess(self, data_cfg: Any, force: bool = False) -> Preprocessed:
        """Run (or reuse) preprocessing with Ray Data; returns (output folder, manifest)."""
        raise NotImplementedError

    def check_inputs(self, data_cfg: Any) -> str:
        """`pipeline doctor`: the inputs list (no decoding); a line saying what was found."""
        raise NotImplementedError

    def model_input(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Entries for the vocabulary and the bundle's model.json that describe the encoder's
        input beyond token ids ({} for text)."""
        return {}

    def build_model(self, model_cfg: Any, vocab: Vocab) -> Any:
        """The encoder-decoder for this task's input (token ids here)."""
        from ..models import build_model

        return build_model(model_cfg=model_cfg, **{**vocab.model_args(), "video": self.model_input_of(vocab)})

    def model_input_of(self, vocab: Vocab) -> dict[str, Any] | None:
        """What :meth:`model_input` put into the vocabulary, for ``build_model`` (None: tokens)."""
        return None

    def target_tokens(self, data_dir: str) -> int:
        """Target tokens of the training split, each target with its end token: what
        ``train.batch_tokens=0`` sizes the batches from."""
        import pyarrow.compute as pc

        from ..data.output import read_column

        lengths = read_column(f"{data_dir}/train", "tgt_len")
        return int(pc.sum(lengths).as_py() or 0) + len(lengths)

    def split_rows(self, split: dict[str, Any]) -> int:
        """Rows of a split in its Parquet files (the manifest's counts of that split)."""
        return split["kept"]

    def usage(self, bundle: str) -> str:
        """How to use a trained model, as the summary of `pipeline train` shows it."""
        raise NotImplementedError

    def data_metrics(self, manifest: dict[str, Any]) -> dict[str, float]:
        """The manifest's counts as MLflow metrics: rows read, kept and dropped per reason."""
        return {
            "data_rows_read": manifest["rows_read"],
            "data_rows_kept": manifest["rows_kept"],
            **{f"data_dropped_{k}": v for k, v in manifest["dropped"].items()},
        }

    # -- batches ---------------------------------------------------------------------------
    def rows_per_read(self, mega_rows: int) -> int:
        """Rows per mega-batch read from a shard (a mega-batch is cut into token-budget batches)."""
        return mega_rows

    def batches(
        self,
        mega_batches: Any,
        batch_tokens: int,
        specials: tuple[int, int, int],
        rng: np.random.Generator | None,
        pin: bool,
        skip: np.ndarray | None,
    ) -> Any:
        """Mega-batches of rows -> training Batches (rows whose id is in ``skip`` left out)."""
        raise NotImplementedError

    def blank_batch(self, vocab: Vocab) -> Any:
        """The input of a zero-weight step (a rank whose shard ran out): one tiny example."""
        raise NotImplementedError

    # -- evaluation ------------------------------------------------------------------------
    def eval_rows(
        self, model: Any, rows: dict[str, list], beam_size: int, length_penalty: float, device: Any, with_loss: bool
    ) -> dict[str, Any]:
        """A rank's rows -> {id, src, ref, hyp_ids, batches}: ``batches`` the loss batches (or
        None without loss), ``ref`` one reference or a list of them per row."""
        raise NotImplementedError

    def scores(self, hyp: list[str], ref: list[Any], final: bool = False) -> dict[str, float]:
        """Scores of outputs against references; ``final``: the test split's full set."""
        raise NotImplementedError

    # -- test decoding on Ray Data ---------------------------------------------------------
    def decoder(self) -> type:
        """The Ray Data actor class that decodes a batch of a split with a bundle: its
        constructor takes (bundle, beam_size, length_penalty); it returns id, src, tgt, hyp."""
        raise NotImplementedError

    def decoded(self, out: dict[str, list]) -> dict[str, list]:
        """Rows the decoder returned -> src, tgt (references), hyp lists."""
        return out

    def sample_table(self, res: dict[str, list], picks: list[int]) -> tuple[dict[str, list], str]:
        """A few test outputs as an MLflow table and its artifact file."""
        raise NotImplementedError

    def log_samples(self, log: Any, data_dir: str, res: dict[str, list], picks: list[int]) -> None:
        """Anything more a reviewer should see of the test outputs (a task may add nothing)."""

    def model_example(self, cfg: Any, data_dir: str, res: dict[str, list]) -> list[str]:
        """The logged MLflow model's input example."""
        raise NotImplementedError

    def is_captioning(self) -> bool:
        """The bundle kind: whether the model is a captioner (video input) or a translator."""
        return False
