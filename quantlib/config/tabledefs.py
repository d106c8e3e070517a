"""The `tables:` entries of the config, checked: which models, rows, settings and metrics each table shows."""

from __future__ import annotations

from dataclasses import dataclass

from quantlib.catalog import names
from quantlib.errors import ConfigError
from quantlib.evaluation.metrics import is_lower_better


@dataclass
class TableDef:
    key: str
    title: str
    models: list[str]
    rows: list[str]
    settings: list[str]
    metrics: list[str]
    paper: dict
    paper_source: str | None
    averages: dict[str, dict] = None
    layout: str = "long"
    default_target: bool = True
    seeds: list[int] | None = None
    compare: list[list[str]] | None = None

    @property
    def columns(self) -> list[str]:
        """Displayed columns: the metrics in order, then the averages not named among them."""
        return self.metrics + [a for a in (self.averages or {}) if a not in self.metrics]

    def result_metrics(self) -> list[str]:
        """Every metric read from result files: the displayed ones and the parts of the averages."""
        avg = self.averages or {}
        return list(dict.fromkeys([m for m in self.metrics if m not in avg] + [p for a in avg.values()
                                                                                 for p in a["of"]]))


def table_def(key: str, t: dict, exp) -> TableDef:
    """A `tables:` entry checked against the experiment's models, methods, perplexity datasets and tasks."""
    models = t.get("models") or list(exp.cfg["run_models"])
    for m in models:
        if m not in exp.cfg["run_models"]:
            raise ConfigError(f"tables.{key}.models: '{m}' is not in run_models")
    rows = t.get("rows") or ["fp", *exp.methods]
    for r in rows:
        if r != "fp" and r not in exp.methods:
            raise ConfigError(f"tables.{key}.rows: unknown method id '{r}'; ids: fp, {', '.join(exp.methods)}")
    all_settings = list(dict.fromkeys(names.setting_token(b, g) for r in rows if r != "fp"
                                      for b, g in exp.methods[r].settings()))
    settings = t.get("settings") or all_settings
    for s in settings:
        if s not in all_settings:
            raise ConfigError(f"tables.{key}.settings: '{s}' is not produced by any row; produced: "
                              f"{', '.join(all_settings)}")
    averages = {a: {"of": v} if isinstance(v, list) else v for a, v in (t.get("averages") or {}).items()}
    metrics = t.get("metrics") or list(exp.cfg["perplexity"]["datasets"])
    for avg, spec in averages.items():
        if avg in exp.cfg["perplexity"]["datasets"] or "." in avg:
            raise ConfigError(f"tables.{key}.averages: '{avg}' must differ from the perplexity datasets and "
                              "contain no dot")
        for part in spec["of"]:
            if "." not in part:
                raise ConfigError(f"tables.{key}.averages.{avg}: '{part}' is not a task metric "
                                  "`{task}.{metric}`; averages are over lm-eval task metrics")
            _check_metric(exp, key, part)
        if len({is_lower_better(p) for p in spec["of"]}) > 1:
            raise ConfigError(f"tables.{key}.averages.{avg} mixes accuracies with perplexities")
    for metric in metrics:
        if metric not in averages:
            _check_metric(exp, key, metric)
    for pair in t.get("compare") or []:
        if len(set(pair)) < len(pair):
            raise ConfigError(f"tables.{key}.compare: [{', '.join(pair)}] compares row '{pair[0]}' with itself; "
                              f"give two different rows (rows: {', '.join(rows)})")
        for r in pair:
            if r not in rows:
                raise ConfigError(f"tables.{key}.compare: '{r}' is not a row of the table (rows: {', '.join(rows)})")
    return TableDef(key, t.get("title", key), models, rows, settings, metrics, t.get("paper", {}),
                    t.get("paper_source"), averages, t.get("layout", "long"), t.get("default_target", True),
                    t.get("seeds"), t.get("compare"))

def _check_metric(exp, table: str, metric: str) -> None:
    if "." in metric:
        task, _, field = metric.partition(".")
        if task not in exp.lmeval_tasks or not field or "." in field:
            raise ConfigError(
                f"tables.{table}.metrics: '{metric}' names no task of lm_eval.tasks "
                f"({', '.join(exp.lmeval_tasks) or 'none'}); a task metric is `{{task}}.{{metric}}`, e.g. "
                "arc_easy.acc_norm")
    elif metric not in exp.cfg["perplexity"]["datasets"]:
        raise ConfigError(
            f"tables.{table}.metrics: '{metric}' is neither a perplexity dataset (perplexity.datasets: "
            f"{', '.join(exp.cfg['perplexity']['datasets']) or 'none'}), a task metric `{{task}}.{{metric}}` of "
            "lm_eval.tasks, nor a key of the table's averages")
