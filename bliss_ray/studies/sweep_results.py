"""A sweep's results, written where ``bliss-ray report`` reads them: one row per trial (Tune's dataframe plus the
variant, seed, status and the final metrics the objective reports) and the learning curves of each trial's
objective stage, as parquet in OUT/<sweep>/ and in the Tune experiment directory, with ``sweep.json``.

    write_results(tuner.fit(), sweep, exp_dir, out, train_storage)   # raises SweepFailed when a trial failed
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bliss_ray.storage import join as join_uri
from bliss_ray.storage import write_bytes
from bliss_ray.studies.sweep_metrics import FINAL_METRICS
from bliss_ray.studies.sweep_spec import Sweep, sweep_json, trial_run, variant_label
from bliss_ray.train.checkpoint import read_metrics

CURVE_ID = ("trial_id", "variant", "variant_key", "seed", "status")
CURVE_METRICS = ("step", "upper_loss", "lower_loss", "kl")
# final metrics kept beside the objective's, for the report's noise, chance and equal-token checks
FINAL_EXTRA = ("objective_stage", "paper_average_stderr", "paper_average_chance", "target_steps", "target_tokens")
FINAL_EXTRA += ("reached_baseline", "speedup", "baseline_steps", "baseline_reference_loss")


class SweepFailed(RuntimeError):
    """Some trials failed even after their retries; the results of the others are written."""


def _arrow(df: pd.DataFrame) -> pa.Table:
    """Tune dataframes hold object columns of mixed types; store those that arrow cannot type as text."""
    cols = {}
    for c in df.columns:
        try:
            cols[c] = pa.array(df[c], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            cols[c] = pa.array([None if v is None or v != v else str(v) for v in df[c]], pa.string())
    return pa.table(cols)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_results(grid, sweep: Sweep, exp_dir: str, out: str, train_storage: str) -> str:
    """``ResultGrid.get_dataframe()`` (one row per trial, its final metrics) + variant columns, and the learning
    curves (bilevel ``metrics.jsonl`` of each trial's objective stage, or the reports Tune kept), as parquet in the
    experiment directory and in OUT/<sweep>/ (where ``bliss-ray report`` reads them)."""
    spec = sweep.spec
    df = grid.get_dataframe()
    extra, curves = [], []
    for r in grid:
        tid = Path(r.path).name.removeprefix("trial_")
        if r.config is None:  # --results-so-far: a trial the searcher created, never started
            extra.append({"trial_id": tid, "status": "pending"})
            continue
        hist = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        finals = hist[hist["final"] == 1] if "final" in hist else hist.iloc[0:0]
        final = finals.iloc[-1].to_dict() if len(finals) else {}
        point = {k: r.config[k] for k in spec.space if k in r.config}
        seed = r.config.get("seed", spec.seeds[0] if spec.seeds else sweep.base.seed)
        status = "error" if r.error else ("ok" if final else "stopped")
        row = {"trial_id": tid, "variant": variant_label(spec, point), "seed": seed, "status": status}
        row |= {"variant_key": json.dumps(point, sort_keys=True, default=str), "error": str(r.error or "") or None}
        extra.append(row | {k: final[k] for k in (*FINAL_METRICS[spec.stage], *FINAL_EXTRA) if k in final})
        run = trial_run(sweep, r.config | {"seed": seed}, tid, out, train_storage)
        stage = final.get("objective_stage") or f"r{spec.round}.bilevel"
        series = read_metrics(run.uri(stage, "metrics.jsonl")) if stage in run.by_key else []
        if not series and "step" in hist:  # the stage's history is gone (or never written): what Tune kept
            series = hist[hist["final"] != 1].to_dict("records") if "final" in hist else hist.to_dict("records")
        ids = {k: row[k] for k in CURVE_ID}
        curves += [{**ids, "stage": stage, **{k: m.get(k) for k in CURVE_METRICS}} for m in series]
    extra_df = pd.DataFrame(extra)
    if len(df) and "trial_id" in df:
        df = df.drop(columns=[c for c in extra_df.columns if c in df and c != "trial_id"])
        df = df.merge(extra_df, on="trial_id", how="outer")
    else:
        df = extra_df
    files = {
        "sweep_results.parquet": _arrow(df),
        "sweep_curves.parquet": _arrow(pd.DataFrame(curves, columns=[*CURVE_ID, "stage", *CURVE_METRICS])),
    }
    blobs = {name: _parquet_bytes(table) for name, table in files.items()} | {"sweep.json": sweep_json(sweep)}
    for where in dict.fromkeys([join_uri(out, spec.name), exp_dir]):  # OUT/<sweep>/, and the experiment dir
        for name, blob in blobs.items():
            write_bytes(join_uri(where, name), blob)
    path = join_uri(exp_dir, "sweep_results.parquet")
    bad = extra_df[extra_df["status"] == "error"] if len(extra_df) else extra_df
    if len(bad):  # not done: a rerun (or a RayJob retry) resumes and retries exactly these
        errors = "; ".join(f"{r.trial_id} ({r.variant}): {str(r.error)[:200]}" for r in bad.itertuples())
        raise SweepFailed(
            f"{len(bad)} of {len(extra_df)} trials failed: {errors}. Results so far: {path}; rerun the "
            "same command to retry the failed trials"
        )
    return path
