"""Per-item evaluation records (the ``evaluation_items`` table), like lm-eval's --log_samples.

One row per evaluated HellaSwag / LAMBADA item, for an evaluate run and for the baseline
(``condition_id`` NULL) and every condition of a perturb run, so that plain SQL (the
``flipped_items`` view) shows which items a perturbation flips. Columns:

* HellaSwag: ``gold`` = label, ``prediction`` = argmax of the summed per-choice
  log-likelihoods (first maximum wins, as ``np.argmax``), ``acc``, ``acc_norm``,
  ``choice_loglik`` = the summed log-likelihood of every ending;
* LAMBADA: ``gold`` = 1 (the target word is the one right answer), ``prediction`` = 1 when
  every target token is the greedy token (so ``acc`` = prediction == gold), ``target_loglik``
  and ``greedy``.

:class:`ItemRecorder` collects them while a stage evaluates; a stage that reuses a stored
baseline copies that run's baseline items, so every run's items are complete on their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cwa.progress import Reporter
    from cwa.store import Store

_PENDING = object()  # condition id not known yet (see ItemRecorder.evaluate_condition)

ITEM_COLUMNS = (
    "condition_id",
    "task",
    "item_index",
    "gold",
    "prediction",
    "acc",
    "acc_norm",
    "choice_loglik",
    "target_loglik",
    "greedy",
    "task_config_hash",
)


class ItemRecorder:
    """Collects ``evaluation_items`` rows; ``enabled=False`` (``--no-items``) keeps none."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self._calls = 0  # evaluate_condition calls so far

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        plans: Sequence[Any],
        *,
        condition_id: str | None,
        batch_size: int,
        reporter: Reporter | None = None,
    ) -> list[dict[str, Any]]:
        """:func:`~cwa.evaluation.runner.evaluate_model` rows, recording the items."""
        from cwa.evaluation.runner import evaluate_model

        sink: list[dict[str, Any]] | None = [] if self.enabled else None
        rows = evaluate_model(
            model, tokenizer, list(plans), batch_size=batch_size, reporter=reporter, item_sink=sink
        )
        self.rows += [{**item, "condition_id": condition_id} for item in sink or []]
        return rows

    def evaluate_condition(
        self,
        model: Any,
        tokenizer: Any,
        plans: Sequence[Any],
        *,
        batch_size: int,
        reporter: Reporter | None = None,
    ) -> list[dict[str, Any]]:
        """Like :meth:`evaluate` for the next condition of a sweep, whose id is not known yet:
        its items are held until :meth:`tables` gets the sweep's conditions, in call order."""
        rows = self.evaluate(
            model,
            tokenizer,
            plans,
            condition_id=_PENDING,
            batch_size=batch_size,
            reporter=reporter,
        )
        self._calls += 1
        for row in self.rows:
            if row["condition_id"] is _PENDING:
                row["condition_id"] = (_PENDING, self._calls - 1)
        return rows

    def copy_stored(self, store: Store, run_id: str, task_config_hash: str) -> None:
        """Add the baseline items another run stored for this task config (a reused result)."""
        if not self.enabled:
            return
        columns = ", ".join(c for c in ITEM_COLUMNS if c != "condition_id")
        with store.read() as con:
            found = con.execute(
                f"SELECT {columns} FROM evaluation_items WHERE run_id = ? AND condition_id IS "
                "NULL AND task_config_hash = ? ORDER BY task, item_index",
                [run_id, task_config_hash],
            ).fetchall()
        names = [c for c in ITEM_COLUMNS if c != "condition_id"]
        for row in found:
            record = dict(zip(names, row, strict=True))
            if record["choice_loglik"] is not None:
                record["choice_loglik"] = list(record["choice_loglik"])
            self.rows.append({**record, "condition_id": None})

    def frame(self) -> Any:
        """The rows as a polars DataFrame with the table's types (None when there are none)."""
        import polars as pl

        if not self.rows:
            return None
        schema = {
            "condition_id": pl.String,
            "task": pl.String,
            "item_index": pl.Int64,
            "gold": pl.Int32,
            "prediction": pl.Int32,
            "acc": pl.Float64,
            "acc_norm": pl.Float64,
            "choice_loglik": pl.List(pl.Float64),
            "target_loglik": pl.Float64,
            "greedy": pl.Boolean,
            "task_config_hash": pl.String,
        }
        data = {c: [row.get(c) for row in self.rows] for c in ITEM_COLUMNS}
        return pl.DataFrame(data, schema=schema)

    def tables(self, conditions: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """``{"evaluation_items": frame}`` for a StageOutput (empty when nothing recorded).

        ``conditions``: the sweep's condition records in the order they were evaluated; the
        n-th :meth:`evaluate_condition` call's items get the n-th ``condition_id``.
        """
        if self._calls and len(conditions) != self._calls:
            raise RuntimeError(
                f"{self._calls} sweep evaluations but {len(conditions)} conditions were recorded"
            )
        for row in self.rows:
            tag = row["condition_id"]
            if isinstance(tag, tuple) and tag[0] is _PENDING:
                row["condition_id"] = conditions[tag[1]]["condition_id"]
        frame = self.frame()
        return {} if frame is None else {"evaluation_items": frame}


def evaluation_item_rows(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Every stored item of ``run_id`` as dicts (for ``cwa evaluate --json --items``)."""
    with store.read() as con:
        cursor = con.execute(
            f"SELECT {', '.join(ITEM_COLUMNS)} FROM evaluation_items WHERE run_id = ? "
            "ORDER BY condition_id NULLS FIRST, task, item_index",
            [run_id],
        )
        rows = cursor.fetchall()
    out = []
    for row in rows:
        record = dict(zip(ITEM_COLUMNS, row, strict=True))
        if record["choice_loglik"] is not None:
            record["choice_loglik"] = list(record["choice_loglik"])
        out.append(record)
    return out
