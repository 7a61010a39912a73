"""The family report: a table (model, data, params, MACs, top-1, top-5, images/s, vs paper), where the time and
the worker-hours went (the jobs' ``system/ledger_*`` metrics, ``pipelines.compare``), the change against the previous
retrain, and top-1 against MACs.

Params and MACs are measured on the model as evaluated (its head, its resolution) with ``model_complexity``;
the paper's columns are its ImageNet-1k numbers at 224 px (``models.catalog``): the report compares with them
only for ImageNet-1k at 224 px, and otherwise says what it compares with (the previous retrain). The plot
follows the paper's Figure 1: top-1 against MACs, the paper's points beside ours when comparable.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from metaformer_platform.pipelines.outcome import MemberOutcome, PipelineResult

COLUMNS = ("model", "data", "params (M)", "MACs (G)", "top-1", "top-5", "images/s", "paper top-1", "vs paper",
           "registry")
TIME_COLUMNS = ("model", "wall", "queued", "worker-h", "cost", "goodput", "largest losses", "to final top-1",
                "estimate: wall / worker-h / cost")
WEEK_COLUMNS = ("model", "top-1", "time to final top-1", "worker-h", "cost", "flagged")
PAPER_DATA = ("imagenet-1k", "imagenet")  # manifest names of the paper's data (ImageNet-1k)


def like_paper(data_name: str | None, num_classes: int | None, img_size: int) -> bool:
    """The paper's numbers compare with ours only on ImageNet-1k (1000 classes) at 224 px."""
    return (data_name or "").lower() in PAPER_DATA and num_classes == 1000 and img_size == 224


class ReportRow(TypedDict):
    """One evaluated member: measured size, our top-1/top-5/speed, the paper's numbers, its registry version."""

    model: str
    data: str
    params_m: float
    macs_g: float
    img_size: int
    top1: float
    top5: float
    images_per_s: float
    samples: int
    paper_top1: float | None
    paper_params_m: float | None
    paper_macs_g: float | None
    vs_paper: float | None
    registry: str
    alias: str


def rows(result: PipelineResult) -> list[ReportRow]:
    """One row per member that was evaluated (in the pipeline's order)."""
    from metaformer_platform.models import PAPER_MACS_G, PAPER_PARAMS_M, PAPER_TOP1
    from metaformer_platform.pipelines.compare import complexity

    out: list[ReportRow] = []
    for member in result.members:
        metrics = member.eval_metrics
        if not metrics or member.eval_cfg is None:
            continue
        cfg = member.eval_cfg
        size = complexity(member.model, member.num_classes, cfg.data.img_size, cfg.model.kwargs)
        top1 = float(metrics["eval/top1"])
        comparable = like_paper(member.data_name.rsplit(" ", 1)[0], member.num_classes, cfg.data.img_size)
        paper = PAPER_TOP1.get(member.model) if comparable else None
        out.append({
            "model": member.model,
            "data": member.data_name,
            "params_m": size["params"] / 1e6,
            "macs_g": size["macs"] / 1e9,
            "img_size": cfg.data.img_size,
            "top1": top1,
            "top5": float(metrics.get("eval/top5", float("nan"))),
            "images_per_s": float(metrics.get("eval/images_per_s", float("nan"))),
            "samples": int(metrics.get("eval/samples", 0)),
            "paper_top1": paper,
            "paper_params_m": PAPER_PARAMS_M.get(member.model) if comparable else None,
            "paper_macs_g": PAPER_MACS_G.get(member.model) if comparable else None,
            "vs_paper": None if paper is None else top1 - paper,
            "registry": member.registered or "",
            "alias": member.promotion.alias if member.promotion is not None else "",
        })
    return out


def table(data: list[ReportRow]) -> str:
    """A Markdown table (it also reads as plain text in a job's log)."""
    def fmt(row: ReportRow) -> list[str]:
        paper = "n/a" if row["paper_top1"] is None else f"{row['paper_top1']:.1f}"
        delta = "n/a" if row["vs_paper"] is None else f"{row['vs_paper']:+.1f}"
        reg = f"{row['registry']} @{row['alias']}" if row["registry"] else ""
        return [
            row["model"], row["data"], f"{row['params_m']:.3f}", f"{row['macs_g']:.4f}", f"{row['top1']:.2f}",
            f"{row['top5']:.2f}", f"{row['images_per_s']:.0f}", paper, delta, reg,
        ]

    return markdown(COLUMNS, [fmt(r) for r in data])


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _duration(seconds: float | None) -> str:
    from metaformer_platform.tracking.console import format_duration

    return "-" if seconds is None else format_duration(seconds)


def time_table(members: list[MemberOutcome]) -> str:
    """Per member and in total: wall, queue, worker-hours, cost, goodput, the largest losses, time to the final
    top-1, and the estimate made before the run ("-": a figure the runs did not log)."""
    from metaformer_platform.pipelines.compare import largest_losses

    def fmt(model: str, f: dict[str, float]) -> list[str]:
        losses = ", ".join(f"{name} {_duration(s)}" for name, s in largest_losses(f)) or "-"
        estimate = " / ".join([_duration(f.get("estimate_wall_s")), _num(f.get("estimate_worker_hours"), "{:.3f}"),
                               _num(f.get("estimate_cost"))])
        return [model, _duration(f.get("wall_s")), _duration(f.get("queued_s")), _num(f.get("worker_hours"), "{:.3f}"),
                _num(f.get("cost")), _num(f.get("goodput"), "{:.0%}"), losses, _duration(f.get("time_to_final_top1_s")),
                estimate]

    total: dict[str, float] = {}
    for m in members:
        for key, value in m.figures.items():
            if key not in ("top1", "top5", "goodput"):
                total[key] = total.get(key, 0.0) + value
    productive = sum(m.figures["goodput"] * m.figures["wall_s"] for m in members if "goodput" in m.figures)
    if productive and total.get("wall_s"):
        total["goodput"] = productive / total["wall_s"]
    return markdown(TIME_COLUMNS, [fmt(m.model, m.figures) for m in members] + [fmt("total", total)])


def week_table(members: list[MemberOutcome]) -> str:
    """Each member against the previous retrain: before -> now (change) per figure, and what was flagged."""
    from metaformer_platform.pipelines.compare import WEEKLY, change

    def cell(m: MemberOutcome, key: str, relative: bool, fmt: str) -> str:
        now, before = m.figures.get(key), m.previous.get(key)
        if now is None and before is None:
            return "-"
        delta = change(now, before, relative)
        shown = "" if delta is None else f" ({delta:+.1f}%)" if relative else f" ({delta:+.2f})"
        return f"{_num(before, fmt)} -> {_num(now, fmt)}{shown}"

    formats = {"top1": "{:.2f}", "time_to_final_top1_s": "{:.0f}s", "worker_hours": "{:.3f}", "cost": "{:.2f}"}
    cells = [[m.model, *(cell(m, key, rise, formats[key]) for key, _, rise in WEEKLY),
              "REGRESSION: " + "; ".join(m.regressions) if m.regressions else "no"] for m in members]
    return markdown(WEEK_COLUMNS, cells)


def markdown(header: tuple[str, ...], rows_: list[list[str]]) -> str:
    """Rows of cells as a Markdown table, columns padded to their widest cell."""
    cells = [list(header)] + rows_
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells[1:]]
    return "\n".join(lines)


def plot(data: list[ReportRow], path: Path, title: str) -> Path:
    """Top-1 against MACs (log scale), ours and the paper's, as the paper's Figure 1 draws it."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    ours = sorted(data, key=lambda r: r["macs_g"])
    ax.plot([r["macs_g"] for r in ours], [r["top1"] for r in ours], "o-", label=f"this run ({ours[0]['img_size']} px)")
    for r in ours:
        ax.annotate(r["model"], (r["macs_g"], r["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    paper = sorted(
        ((r["paper_macs_g"], r["paper_top1"]) for r in data if r["paper_top1"] is not None and r["paper_macs_g"]),
        key=lambda point: point[0],
    )
    if paper:
        ax.plot([macs for macs, _ in paper], [top1 for _, top1 in paper], "s--", label="paper (224 px)")
    ax.set_xscale("log")
    ax.set_xlabel("MACs (G)")
    ax.set_ylabel("ImageNet-1k top-1 (%)" if paper else f"top-1 (%) on {ours[0]['data']}")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def status_lines(result: PipelineResult) -> list[str]:
    """A line per member: ok, FAILED or KILLED (a run of it was left RUNNING by a driver that is gone, and
    closed, and nothing ran it again), what each stage did, the error and the orphaned runs."""
    lines = []
    for m in result.members:
        orphaned = m.still_orphaned
        stages = ", ".join([f"{s.stage}: {s.action}" for s in m.stages] + [f"{o.stage}: killed (orphaned)" for o in orphaned])
        status = "FAILED" if not m.ok else "KILLED" if orphaned else "ok    "
        lines.append(f"  {m.model:<28} {status} {stages}" + (f"\n      {m.error}" if m.error else ""))
        lines += [f"      {o.stage}: {o.run_name} (MLflow run {o.run_id}) orphaned: {o.detail}" for o in orphaned]
    return lines


def family_report(client: MlflowClient, result: PipelineResult) -> str:
    """Build the report, log it (table, JSON, plot) to the pipeline's parent run, and return its text, secrets
    masked (``storage.redact``: a member's error may quote a URI with its password)."""
    from metaformer_platform.storage.redact import redact, redact_tree

    data = redact_tree(rows(result))
    text = [f"Family report: pipeline {result.name}"]
    text += ["", table(data)] if data else ["", "(no member was evaluated)"]
    if data and all(r["paper_top1"] is None for r in data):
        text += ["", "Not compared with the paper (ImageNet-1k at 224 px): this data and resolution differ; "
                 "compared with the previous retrain instead."]
    text += ["", "Where the time went (the runs' ledgers; - : not logged):", "", time_table(result.members)]
    if result.previous_run_id is None:
        text += ["", "Previous retrain: none (no earlier FINISHED run of this pipeline in the experiment)."]
    else:
        text += ["", f"Against the previous retrain (pipeline run {result.previous_run_id}):", "",
                 week_table(result.members)]
    text += ["", "Status:", *status_lines(result)]
    report = redact("\n".join(text))
    if result.parent_run_id is not None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "family_report.md").write_text(report + "\n")
            figures = {m.model: {"figures": m.figures, "previous": m.previous, "regressions": m.regressions}
                       for m in result.members}
            (folder / "family_report.json").write_text(json.dumps({"rows": data, "members": figures}, indent=2))
            if data:
                plot(data, folder / "family_top1_vs_macs.png", f"{result.name}: top-1 vs MACs")
            client.log_artifacts(result.parent_run_id, str(folder), "report")
    return report
