"""Regenerate the speed sections of docs/BENCHMARKS.md and their plots from the raw figures.

    .venv/bin/python benchmarks/report.py          # --help for the paths

Reads ``docs/ann.json``, ``docs/step.json``, ``docs/serve.json`` and ``docs/echo.json`` (written
by ``benchmarks/ann.py``, ``step.py``, ``serve.py`` and ``echo.py``). For each file present it
writes ``docs/img/NAME.png`` and rewrites the generated blocks of ``docs/BENCHMARKS.md`` between
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` (``ann``, ``step``, ``serve`` plus
``serve-bytes`` for the Redis bytes table, ``echo``): a line on the recorded run (versions,
threads, commit where the JSON has them), the tables — rendered by the benchmark scripts' own
functions, so a script prints what the document shows — the summary figures with their target
verdicts computed from the numbers, and a link to the plot. A missing JSON file leaves its
blocks and plot as they are. Everything outside the blocks (the hand-written prose) is left as
is, and so is the ``quality`` block, which ``benchmarks/quality_report.py`` renders.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import ann, echo, serve, step  # noqa: E402
from benchmarks.quality_report import pyplot as _pyplot  # noqa: E402
from benchmarks.quality_report import replace_block  # noqa: E402
from benchmarks.quality_report import save_figure as _save  # noqa: E402


class MissingBlockError(ValueError):
    """The Markdown file lacks a generated block's markers: nothing is written."""


@dataclass(frozen=True)
class Section:
    name: str  # the JSON file's stem and the plot's
    blocks: tuple[str, ...]  # generated block names, in document order
    render: Callable[[dict, str], dict[str, str]]  # (figures, plot link) → block name → text
    plot: Callable[[dict, Path], None]


# ----------------------------------------------------------------------------- run


def report(docs: Path, markdown: Path, img: Path) -> list[str]:
    """Render every section whose ``docs/NAME.json`` exists; one note per section.

    The markers of every block to write are checked first, so a missing one raises
    ``MissingBlockError`` before any plot or block is written.
    """
    figures = {s.name: load(docs / f"{s.name}.json") for s in SECTIONS}
    present = [s for s in SECTIONS if figures[s.name] is not None]
    check_blocks(markdown, [b for s in present for b in s.blocks])
    notes = []
    for s in SECTIONS:
        data = figures[s.name]
        if data is None:
            notes.append(
                f"{s.name}: {docs / s.name}.json missing; blocks {', '.join(s.blocks)} "
                "and the plot left as they are"
            )
            continue
        img.mkdir(parents=True, exist_ok=True)
        png = img / f"{s.name}.png"
        s.plot(data, png)
        link = Path(os.path.relpath(png, markdown.parent)).as_posix()
        for block, text in s.render(data, link).items():
            replace_block(markdown, block, text)
        notes.append(f"{s.name}: blocks {', '.join(s.blocks)} of {markdown}; plot {png}")
    return notes


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def check_blocks(markdown: Path, blocks: list[str]) -> None:
    """Every block must already be in place: ``replace_block`` would append a missing one at
    the end of the file under the quality section's heading."""
    doc = markdown.read_text()
    for name in blocks:
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin not in doc or end not in doc or doc.index(begin) > doc.index(end):
            raise MissingBlockError(
                f"{markdown} has no generated block {name!r}: put the lines {begin} and {end}, "
                "in that order, where its tables belong"
            )


def _join(*parts: str) -> str:
    """Block text: parts separated by blank lines, ending in a newline (``replace_block``)."""
    return "\n\n".join(p for p in parts if p) + "\n"


def _image(name: str, link: str) -> str:
    return f"![{name}]({link})"


# ----------------------------------------------------------------------------- step


def render_step(data: dict, link: str) -> dict[str, str]:
    return {
        "step": _join(
            step_machine(data),
            step.markdown_table(data["results"]),
            step_summary(data),
            _image("step", link),
        )
    }


def step_machine(data: dict) -> str:
    a = data["args"]
    return (
        f"Recorded run (`docs/step.json`): torch {data['torch_version']}, device "
        f"`{data['device']}`, {data['threads']} intra-op threads; median of {a['repeats']} calls "
        f"after {a['warmup']} warm-up calls."
    )


def step_summary(data: dict) -> str:
    rows = data["results"]
    lines = [
        f"- T = {r['T']}, B = {r['B']}: step {r['speedup_tokens']:.1f}× faster than the recompute "
        f"with tokens given, {r['speedup_items']:.1f}× from items; target ≥ T/4 = "
        f"{r['target']:g}×: **{_met(r['target_met_tokens'])}** / "
        f"**{_met(r['target_met_items'])}**"
        for r in rows
        if r["B"] == 64
    ] or ["- No B = 64 run recorded: the brief's target (≥ T/4 at B = 64) is not checked."]
    worst = max(max(r["max_abs_diff"].values()) for r in rows)
    lines.append(
        f"- Parity, step vs full recompute (max abs diff over every config, query step and "
        f"after append): {worst:.1e} (the script refuses above {data['args']['tolerance']:.0e})"
    )
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def plot_step(data: dict, path: Path) -> None:
    plt = _pyplot()
    rows = data["results"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for batch, color in zip(
        sorted({r["B"] for r in rows}),
        ("tab:blue", "tab:orange", "tab:green", "tab:red"),
        strict=False,
    ):
        rs = sorted((r for r in rows if r["B"] == batch), key=lambda r: r["T"])
        ts = [r["T"] for r in rs]
        ax.plot(
            ts,
            [r["speedup_tokens"] for r in rs],
            "o-",
            color=color,
            label=f"B = {batch}, tokens given",
        )
        ax.plot(
            ts,
            [r["speedup_items"] for r in rs],
            "s--",
            color=color,
            label=f"B = {batch}, from items",
        )
    ts = sorted({r["T"] for r in rows})
    ax.plot(ts, [t / 4 for t in ts], "k:", label="target T/4 (brief: at B = 64)")
    ax.set_yscale("log")
    ax.set_xticks(ts)
    ax.set_xlabel("history length T (closed sessions)")
    ax.set_ylabel("speedup of the step over a full recompute (×)")
    ax.set_title(
        f"Incremental step vs full recompute ({data['device']}, {data['threads']} threads)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


# ----------------------------------------------------------------------------- ann


def render_ann(data: dict, link: str) -> dict[str, str]:
    return {
        "ann": _join(
            ann_machine(data), ann.markdown_table(data), ann_summary(data), _image("ann", link)
        )
    }


def ann_machine(data: dict) -> str:
    a, rows = data["args"], data["results"]
    where = "GPU" if any(r["on_gpu"] for r in rows) else "CPU"
    return (
        f"Recorded run (`docs/ann.json`): faiss {data['faiss_version']}, {data['omp_threads']} "
        f"OpenMP threads, indexes on {where}; n = {a['n']:,}, d = {a['d']}, {a['queries']:,} "
        f"queries, {a['clusters']:,} clusters, k = {a['k']}, seed {a['seed']}."
    )


def ann_summary(data: dict) -> str:
    """Which indexes reach the brief's target, at which batch sizes."""
    rows = data["results"]
    flat = next((r for r in rows if r["config"] == "flat"), None)
    target = (
        f"Target (brief): recall@{data['args']['k']} ≥ {ann.RECALL_TARGET:g} at "
        f"≥ {ann.SPEEDUP_TARGET:g}× the flat index's QPS"
    )
    if flat is None:
        return f"- {target}: not checked (no flat index in this run)."
    met = []
    for r in rows:
        batches = [
            b
            for b in ("1", "64")
            if r is not flat
            and r["recall"] >= ann.RECALL_TARGET
            and r["qps"][b] >= ann.SPEEDUP_TARGET * flat["qps"][b]
        ]
        if batches:
            only = "" if len(batches) == 2 else f" (batch {batches[0]} only)"
            met.append(r["config"].upper() + only)
    if not met:
        return f"- {target} — **not met** by any index."
    return f"- {target} — **met** by {' and '.join(met)}."


def plot_ann(data: dict, path: Path) -> None:
    plt = _pyplot()
    rows = data["results"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = dict(
        zip(
            [r["config"] for r in rows],
            ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red"),
            strict=False,
        )
    )
    for r in rows:
        for b, marker in (("1", "o"), ("64", "s")):
            ax.scatter(
                r["qps"][b],
                r["recall"],
                marker=marker,
                s=50,
                color=colors[r["config"]],
                label=f"{r['config']}, batch {b}",
            )
    flat = next((r for r in rows if r["config"] == "flat"), None)
    if flat is not None:
        for b, style in (("1", ":"), ("64", "-.")):
            ax.axvline(
                ann.SPEEDUP_TARGET * flat["qps"][b],
                color="k",
                ls=style,
                lw=1,
                label=f"{ann.SPEEDUP_TARGET:g}× flat QPS, batch {b}",
            )
    ax.axhline(
        ann.RECALL_TARGET, color="tab:red", ls="--", lw=1, label=f"recall {ann.RECALL_TARGET:g}"
    )
    ax.set_xscale("log")
    ax.set_ylim(min(ann.RECALL_TARGET, *(r["recall"] for r in rows)) - 0.01, 1.005)
    ax.set_xlabel("queries / s (log)")
    ax.set_ylabel(f"recall@{data['args']['k']}")
    ax.set_title(
        f"ANN at {data['args']['n']:,} items, d = {data['args']['d']}"
        "\n(target: above the red line and right of the black one of the same batch size)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    _save(fig, path)


# ----------------------------------------------------------------------------- serve


def render_serve(data: dict, link: str) -> dict[str, str]:
    return {
        "serve": _join(
            service_machine(data, "serve"), serve.throughput_markdown(data), _image("serve", link)
        ),
        "serve-bytes": _join(serve.bytes_markdown(data)),
    }


def service_machine(data: dict, name: str) -> str:
    """The recorded-run line of serve.json / echo.json (same ``machine`` and ``git`` keys)."""
    m, g = data["machine"], data.get("git", {})
    parts = [f"{m['cpus']} CPU cores ({m['processor']})", f"Python {m['python']}"]
    if "fastapi" in m:
        parts.append(
            f"FastAPI {m['fastapi']}, uvicorn {m['uvicorn']} (uvloop {m['uvloop']}, "
            f"httptools {m['httptools']})"
        )
    torch = f"torch {m['torch']}"
    parts.append(
        torch + (f" ({m['torch_threads']} intra-op threads)" if "torch_threads" in m else "")
    )
    parts.append(f"faiss {m['faiss']}")
    if "redis_server" in m:
        parts.append(f"redis-server {m['redis_server']} ({m['redis_allocator']} malloc)")
    if "httpx" in m:
        parts.append(f"httpx {m['httpx']}")
    line = f"Recorded run (`docs/{name}.json`): " + ", ".join(parts)
    if g.get("commit"):
        dirty = " with uncommitted serving-code changes" if g.get("serving_code_dirty") else ""
        line += f"; service at commit {g['commit'][:7]}{dirty}"
    return line + f"; {data['elapsed_s']:g} s in all."


def plot_serve(data: dict, path: Path) -> None:
    plt = _pyplot()
    t = data["throughput"]
    runs = {(r["config"], r["client"], r["round"]): r for r in t["runs"]}
    groups = sorted({(c, rnd) for _, c, rnd in runs}, key=lambda g: (g[0] != "raw", g))
    x = list(range(len(groups)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    bars = [(cfg, q) for cfg in ("batched", "unbatched") for q in ("p50", "p99")]
    for i, cfg in enumerate(("batched", "unbatched")):
        rps = [_get(runs, (cfg, c, rnd), lambda r: r["throughput_rps"]) for c, rnd in groups]
        left.bar([v + (i - 0.5) * 0.38 for v in x], rps, 0.38, label=cfg)
    for i, (cfg, q) in enumerate(bars):
        ms = [_get(runs, (cfg, c, rnd), lambda r, q=q: r["latency_ms"][q]) for c, rnd in groups]
        right.bar(
            [v + (i - 1.5) * 0.2 for v in x],
            ms,
            0.2,
            label=f"{cfg} {q}",
            color=("tab:blue" if cfg == "batched" else "tab:orange"),
            alpha=1.0 if q == "p50" else 0.5,
        )
    labels = [f"{c} client\nround {rnd}" for c, rnd in groups]
    left.set_title(
        f"Throughput at {t['concurrency']} clients (target: batched ≥ "
        f"{serve.TARGET_RATIO:g}× unbatched)"
    )
    left.set_ylabel("req/s")
    right.set_title("Client-side latency")
    right.set_ylabel("ms (log)")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xticks(x, labels)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def _get(runs: dict, key: tuple, field: Callable[[dict], float]) -> float:
    return field(runs[key]) if key in runs else float("nan")


# ----------------------------------------------------------------------------- echo


def render_echo(data: dict, link: str) -> dict[str, str]:
    return {
        "echo": _join(
            echo_machine(data),
            echo.markdown(data) + "\n" + echo_answers(data),
            _image("echo", link),
        )
    }


def echo_machine(data: dict) -> str:
    runs = data["runs"]
    loads = [x for r in runs for x in (r["loadavg_before"][0], r["loadavg_after"][0])]
    quiet = (
        f"; load average (1 min) {min(loads):.2f}–{max(loads):.2f} across the phases, other "
        f"processes at most {max(r['other_cores'] for r in runs):.2f} cores in any phase."
    )
    return service_machine(data, "echo").removesuffix(".") + quiet


def echo_answers(data: dict) -> str:
    """What the client checked in the answers: statuses, the service's item count, the echo's
    faithfulness."""
    runs, k = data["runs"], data["load"]["k"]
    measured = sum(r["requests"] for r in runs)
    non_200 = sum(r["non_200"] for r in runs)
    short = sum(r.get("answers_with_fewer_than_k_items", 0) for r in runs)
    mismatched = sum(r.get("echo_mismatches", 0) for r in runs)
    return (
        f"- Answers: {non_200:,} non-200 of {measured:,} measured requests; service answers with "
        f"fewer than {k} items: {short:,}; echo answers differing from their request: "
        f"{mismatched:,}."
    )


def plot_echo(data: dict, path: Path) -> None:
    plt = _pyplot()
    runs, s = data["runs"], data["summary"]
    by = {(r["phase"], r["server"], r["round"]): r for r in runs}
    rounds = sorted({r["round"] for r in runs})
    x = list(range(len(rounds)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, server in enumerate(("service", "echo")):
        off = [v + (i - 0.5) * 0.38 for v in x]
        left.bar(
            off,
            [_get(by, ("max", server, n), lambda r: r["throughput_rps"]) for n in rounds],
            0.38,
            label=server,
        )
        right.bar(
            off,
            [_get(by, ("half", server, n), lambda r: r["latency_ms"]["p99"]) for n in rounds],
            0.38,
            label=server,
        )
    left.axhline(
        echo.TARGET_THROUGHPUT * s["echo_rps"],
        color="k",
        ls="--",
        lw=1,
        label=f"target: {echo.TARGET_THROUGHPUT:g} × echo (median)",
    )
    right.axhline(
        echo.TARGET_P99 * s["echo_half_p99_ms"],
        color="k",
        ls="--",
        lw=1,
        label=f"target: {echo.TARGET_P99:g} × echo p99 (median)",
    )
    left.set_title(f"Max throughput, closed loop: service / echo = {s['throughput_ratio']:g}×")
    left.set_ylabel("req/s")
    right.set_title(
        f"p99 at half load ({s['half_load_rps']:,.0f} req/s offered to both): {s['p99_ratio']:g}×"
    )
    right.set_ylabel("ms (log)")
    right.set_yscale("log")
    max_rps = max((r["throughput_rps"] for r in runs if r["phase"] == "max"), default=1.0)
    max_p99 = max((r["latency_ms"]["p99"] for r in runs if r["phase"] == "half"), default=1.0)
    left.set_ylim(0, 1.25 * max_rps)  # room for the legend
    right.set_ylim(top=5 * max_p99)
    for ax in (left, right):
        ax.set_xticks(x, [f"round {n}" for n in rounds])
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


# ----------------------------------------------------------------------------- plots


SECTIONS = (
    Section("ann", ("ann",), render_ann, plot_ann),
    Section("step", ("step",), render_step, plot_step),
    Section("serve", ("serve", "serve-bytes"), render_serve, plot_serve),
    Section("echo", ("echo",), render_echo, plot_echo),
)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="folder of the NAME.json files")
    p.add_argument(
        "--markdown",
        type=Path,
        default=ROOT / "docs" / "BENCHMARKS.md",
        help="the document whose generated blocks are rewritten",
    )
    p.add_argument("--img", type=Path, default=ROOT / "docs" / "img", help="where NAME.png go")
    args = p.parse_args(argv)
    try:
        notes = report(args.docs, args.markdown, args.img)
    except MissingBlockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
