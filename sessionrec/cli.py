"""`sessionrec` — the one command-line entry point.

Subcommands import their heavy modules (torch, pandas) lazily so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from model_store.artifacts import ArtifactError  # stdlib only: keeps --help instant
from model_store.registry import RegistryError

DESCRIPTION = """\
Next-session recommendation after SessionRec (arXiv 2502.10157).

Typical flow:
  sessionrec data prepare --source taobao --out data/taobao
  sessionrec train --data data/taobao --registry artifacts --promote
  sessionrec train --data data/taobao --registry artifacts --model sasrec
  sessionrec evaluate --data data/taobao --registry artifacts --model current --model latest
  sessionrec demo                      # all of it on synthetic data
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    # User mistakes and refused artifacts carry a message that says what is wrong (DatasetError
    # is a ValueError); anything else is a bug and keeps its traceback.
    except (ValueError, FileNotFoundError, ArtifactError, RegistryError) as exc:
        print(f"sessionrec: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionrec",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    data = sub.add_parser("data", help="prepare datasets").add_subparsers(
        title="data commands", metavar="COMMAND"
    )
    p = data.add_parser(
        "prepare",
        help="event log → sessions → train/val/test split, saved to a directory",
        description="Load a source, cut it into sessions, split it (last positive session of "
        "each user with >= 3 positive sessions is TEST, the one before VAL) and save it. "
        "Format: docs/DATA.md.",
    )
    p.add_argument(
        "--source", required=True, choices=["synthetic", "taobao", "globo", "mind", "csv"]
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--path",
        type=Path,
        help="input file/folder (default: ../shared/datasets/<source>; required for csv)",
    )
    p.add_argument(
        "--gap-minutes",
        type=float,
        default=30.0,
        help="inactivity gap that starts a new session when the data has no "
        "session id (default 30)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-users", type=int, help="globo: sample this many users")
    p.add_argument("--max-files", type=int, help="globo: read only the first N hourly files")
    p.add_argument(
        "--mind-history",
        choices=["session", "none"],
        default="session",
        help="mind: the click history column as one pseudo-session, or ignored",
    )
    p.add_argument("--users", type=int, help="synthetic: number of users (default 2000)")
    p.add_argument("--items", type=int, help="synthetic: catalogue size (default 2000)")
    p.set_defaults(handler=cmd_prepare)

    p = sub.add_parser(
        "train",
        help="train SessionRec or the SASRec-style baseline; save a registry version",
        description="Train on the TRAIN sessions, early-stop on validation Recall@50, "
        "evaluate on TEST and write a versioned artifact (config, safetensors weights, item "
        "vectors, id map, metrics, checksummed manifest) into the registry.",
    )
    p.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    p.add_argument(
        "--registry",
        type=Path,
        default=Path("artifacts"),
        help="model registry directory (default ./artifacts)",
    )
    p.add_argument("--model", choices=["sessionrec", "sasrec"], default="sessionrec")
    p.add_argument("--promote", action="store_true", help="point CURRENT at the new version")
    _add_train_options(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="next-session Recall/NDCG/HR@{10,50,100} and in-session AUC",
        description="Evaluate registry models and the popularity baseline under the same "
        "next-session protocol; prints a table and writes JSON.",
    )
    p.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    p.add_argument("--registry", type=Path, default=Path("artifacts"))
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="REF",
        help="version, unique prefix, 'current' or 'latest'; repeatable (default: current)",
    )
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument(
        "--no-baselines", action="store_true", help="skip the popularity and recent-items rows"
    )
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(handler=cmd_evaluate)

    models = sub.add_parser("models", help="the model registry").add_subparsers(
        title="models commands", metavar="COMMAND"
    )
    p = models.add_parser("list", help="list versions (* marks CURRENT)")
    p.add_argument("--registry", type=Path, default=Path("artifacts"))
    p.set_defaults(handler=cmd_models_list)
    p = models.add_parser("promote", help="verify a version and point CURRENT at it")
    p.add_argument("version", help="version, unique prefix or 'latest'")
    p.add_argument("--registry", type=Path, default=Path("artifacts"))
    p.set_defaults(handler=cmd_models_promote)

    index = sub.add_parser("index", help="the FAISS item index").add_subparsers(
        title="index commands", metavar="COMMAND"
    )
    p = index.add_parser(
        "build",
        help="build a FAISS index over a model version's item vectors",
        description="Build a flat, IVF (nprobe tuned to the recall target) or HNSW index over "
        "the item vectors of one model version, add it to that version's artifact (checksum "
        "in the manifest) and print recall@k against exact search and queries per second.",
    )
    p.add_argument("--model", default="current", help="version, unique prefix, current, latest")
    p.add_argument("--registry", type=Path, default=Path("artifacts"))
    p.add_argument(
        "--kind",
        choices=["auto", "flat", "ivf", "hnsw"],
        default="auto",
        help="auto: flat below 100k items, IVF above [auto]",
    )
    p.add_argument("--nprobe", type=int, help="IVF: fix nprobe instead of tuning it")
    p.add_argument(
        "--recall-target",
        type=float,
        default=0.95,
        help="IVF: tune nprobe to reach this recall@100 vs exact [0.95]",
    )
    p.add_argument(
        "--report-queries",
        type=int,
        default=512,
        help="held-out queries for the recall/QPS report [512]",
    )
    p.set_defaults(handler=cmd_index_build)

    p = sub.add_parser(
        "backfill",
        help="load users' histories from a prepared dataset into Redis (with warm caches)",
        description="Append every user's sessions to the Redis session log (the same atomic, "
        "idempotent script the service uses; pipelined) and build their K/V caches with the "
        "served model (batched prefill). Re-running it changes nothing. Without --redis-url "
        "it uses the embedded Redis under --data-dir, which must not be serving at the time.",
    )
    p.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    _add_state_options(p)
    p.add_argument("--users", type=int, help="only the first N users [all]")
    p.add_argument(
        "--holdout",
        choices=["none", "val", "test"],
        default="none",
        help="keep each user's sessions from this held-out session on out of Redis [none]",
    )
    p.add_argument("--chunk", type=int, default=256, help="users per pipelined batch [256]")
    p.set_defaults(handler=cmd_backfill)

    p = sub.add_parser(
        "serve",
        help="run the HTTP service",
        description="Serve POST /recommend/session and the rest of the API (OpenAPI at /docs). "
        "Every setting is also an environment variable SESSIONREC_<NAME> (see the README); "
        "flags given here win. Without --redis-url an embedded redis-server persists under "
        "--data-dir.",
    )
    _add_serve_options(p)
    _add_state_options(p)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser(
        "demo",
        help="synthetic data → models → index → embedded Redis → backfill → serve",
        description="Prepare synthetic data, train SessionRec (promoted) and the SASRec-style "
        "baseline, print the side-by-side evaluation table, build the FAISS index, backfill "
        "every user into an embedded Redis and serve, printing a ready-to-paste curl.",
    )
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--users", type=int, default=2000, help="synthetic users [2000]")
    p.add_argument("--items", type=int, default=2000, help="synthetic items [2000]")
    p.add_argument("--no-serve", action="store_true", help="stop after the table and backfill")
    _add_serve_options(p)
    p.set_defaults(handler=cmd_demo)
    return parser


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address [127.0.0.1]")
    p.add_argument("--port", type=int, default=8000, help="port [8000]")


def _add_state_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry", type=Path, help="model registry [SESSIONREC_REGISTRY or artifacts]"
    )
    p.add_argument("--model", help="version to serve [SESSIONREC_MODEL_REF or current]")
    p.add_argument("--redis-url", help="Redis URL [SESSIONREC_REDIS_URL or embedded]")
    p.add_argument(
        "--data-dir", type=Path, help="embedded Redis data [SESSIONREC_DATA_DIR or runs/serve]"
    )


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from training.config import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("model and training (defaults in brackets)")
    g.add_argument("--dim", type=int, default=d.dim, help=f"embedding size [{d.dim}]")
    g.add_argument("--layers", type=int, default=d.n_layers, help=f"[{d.n_layers}]")
    g.add_argument("--heads", type=int, default=d.n_heads, help=f"[{d.n_heads}]")
    g.add_argument("--dropout", type=float, default=d.dropout, help=f"[{d.dropout}]")
    g.add_argument(
        "--window",
        type=int,
        default=d.window,
        help=f"W: sessions each token attends to / kept in the K/V cache [{d.window}]",
    )
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"[{d.epochs}]")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"users [{d.batch_size}]")
    g.add_argument("--lr", type=float, default=d.lr, help=f"[{d.lr}]")
    g.add_argument(
        "--negatives",
        type=int,
        default=d.n_negatives,
        help=f"sampled negatives per step (log-Q corrected) [{d.n_negatives}]",
    )
    g.add_argument("--temperature", type=float, default=d.temperature, help=f"[{d.temperature}]")
    g.add_argument(
        "--rank-alpha",
        type=float,
        default=d.rank_alpha,
        help=f"weight of the in-session rank loss [{d.rank_alpha}]",
    )
    g.add_argument(
        "--reveal-prob",
        type=float,
        default=d.reveal_prob,
        help=f"chance a target reveals a prefix as query context [{d.reveal_prob}]",
    )
    g.add_argument(
        "--reveal-mode",
        choices=["replace", "extra"],
        default=d.reveal_mode,
        help="a revealing query replaces the target's plain query, or is added beside it "
        f"[{d.reveal_mode}]",
    )
    g.add_argument(
        "--query-time",
        choices=["gap+hour", "gap", "none"],
        default=d.query_time,
        help=f"time features of the query token [{d.query_time}]",
    )
    g.add_argument(
        "--loss-weight",
        choices=["positive", "session"],
        default=d.loss_weight,
        help=f"retrieval loss averaged per positive, or per target session first [{d.loss_weight}]",
    )
    g.add_argument(
        "--no-ise-negatives",
        action="store_true",
        help="ablation: session tokens pool positives only",
    )
    g.add_argument(
        "--no-context",
        action="store_true",
        help="ablation: the query token carries no request context",
    )
    g.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help=f"epochs without a better validation Recall@50 before stopping [{d.patience}]",
    )
    g.add_argument(
        "--min-epochs",
        type=int,
        default=d.min_epochs,
        help=f"never stop before this many epochs [{d.min_epochs}]",
    )
    g.add_argument("--time-budget", type=float, help="stop training after this many seconds")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def cmd_prepare(args) -> int:
    from training.loaders import prepare

    options: dict = {}
    if args.path is not None:
        options["path"] = args.path
    if args.source == "globo":
        options.update(
            {
                k: v
                for k, v in (("max_users", args.max_users), ("max_files", args.max_files))
                if v is not None
            }
        )
    if args.source == "mind":
        options["history"] = args.mind_history
    if args.source == "synthetic":
        options.update(
            {k: v for k, v in (("n_users", args.users), ("n_items", args.items)) if v is not None}
        )
    ds = prepare(
        args.source, args.out, gap_seconds=int(args.gap_minutes * 60), seed=args.seed, **options
    )
    print(json.dumps({"out": str(args.out), **ds.meta["counts"]}, indent=2))
    return 0


def cmd_train(args) -> int:
    from model_store.registry import Registry
    from training.config import TrainConfig
    from training.dataset import PreparedDataset
    from training.metrics import format_table
    from training.pipeline import train_and_save

    cfg = TrainConfig(
        model=args.model,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        dropout=args.dropout,
        window=args.window,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        n_negatives=args.negatives,
        temperature=args.temperature,
        rank_alpha=args.rank_alpha,
        reveal_prob=args.reveal_prob,
        reveal_mode=args.reveal_mode,
        query_time=args.query_time,
        loss_weight=args.loss_weight,
        use_negatives=not args.no_ise_negatives,
        use_context=not args.no_context,
        patience=args.patience,
        min_epochs=args.min_epochs,
        time_budget_s=args.time_budget,
        seed=args.seed,
        device=args.device,
    )
    ds = PreparedDataset.load(args.data)
    trained = train_and_save(
        ds, cfg, Registry(args.registry), data_path=args.data, promote=args.promote
    )
    m = trained.metrics
    print(
        f"version {trained.version} (best epoch {m['best_epoch']}, "
        f"{m['train_seconds']:.0f}s){' — promoted to CURRENT' if args.promote else ''}"
    )
    print(format_table({"val": m["val"], "test": m["test"]}))
    return 0


def cmd_evaluate(args) -> int:
    from model_store.registry import Registry
    from training.dataset import PreparedDataset, Split
    from training.metrics import format_table
    from training.pipeline import evaluate_models, write_results

    ds = PreparedDataset.load(args.data)
    split = Split[args.split.upper()]
    rows = evaluate_models(
        ds,
        Registry(args.registry),
        args.model or ["current"],
        split=split,
        baselines=not args.no_baselines,
        device=args.device,
    )
    print(format_table(rows))
    if args.out:
        write_results(args.out, rows, split=split, ds=ds)
        print(f"wrote {args.out}")
    return 0


def cmd_models_list(args) -> int:
    from model_store.registry import Registry

    registry = Registry(args.registry)
    current = registry.current()
    for version in registry.versions():
        print(f"{'*' if version == current else ' '} {version}")
    return 0


def cmd_models_promote(args) -> int:
    from model_store.registry import Registry

    registry = Registry(args.registry)
    version = registry.resolve(args.version)
    registry.promote(version)
    print(f"CURRENT → {version}")
    return 0


def cmd_index_build(args) -> int:
    from index import (
        IndexConfig,
        IndexKind,
        ItemIndex,
        add_index_to_artifact,
        build_index,
        report,
        sample_queries,
    )
    from model_store.registry import Registry
    from model_store.store import read_item_vectors

    registry = Registry(args.registry)
    version = registry.resolve(args.model)
    artifact = registry.open(version)
    vectors = read_item_vectors(artifact)
    config = IndexConfig(
        kind=IndexKind(args.kind), nprobe=args.nprobe, recall_target=args.recall_target
    )
    meta = add_index_to_artifact(artifact.root, build_index(vectors, config))
    item_index = ItemIndex.from_artifact(registry.open(version))
    # Report queries are drawn with another seed than the tuning queries: held out.
    queries = sample_queries(vectors, args.report_queries, seed=config.seed + 1000)
    r = report(item_index, vectors, queries, k=100)
    print(
        f"{version}: {meta.kind} index over {meta.n} items × {meta.d} "
        f"(nprobe={meta.nprobe}, efSearch={meta.ef_search}, {meta.bytes / 2**20:.1f} MiB)"
    )
    print(
        f"recall@{r['k']} vs exact: {r['recall']:.4f}   queries/s: "
        + "  ".join(f"batch {b}: {q:,.0f}" for b, q in r["qps"].items())
    )
    return 0


def cmd_demo(args) -> int:
    from training.pipeline import run_demo

    table = run_demo(args.workdir, epochs=args.epochs, n_users=args.users, n_items=args.items)
    print("\nNext-session retrieval on synthetic data (test split):")
    print(table)
    print(f"\nartifacts: {args.workdir / 'artifacts'}   results: {args.workdir / 'results.json'}")
    settings = _settings(
        registry=args.workdir / "artifacts",
        data_dir=args.workdir / "redis",
        embedded=True,
    )
    report, first_user = _backfill(args.workdir / "data" / "synthetic", settings, None, "none", 256)
    print(f"backfilled {report.users} users ({report.sessions} new sessions) into Redis")
    if args.no_serve:
        return 0
    base = f"http://{args.host}:{args.port}"
    print(
        "\nServing. Try:\n"
        f"  curl -s -X POST {base}/recommend/session -H 'content-type: application/json' "
        f"""-d '{{"user_id": "{first_user}", "k": 10}}'\n"""
        f"  API docs: {base}/docs    Ctrl-C stops.\n",
        flush=True,
    )
    return _serve(settings, args.host, args.port)


def cmd_serve(args) -> int:
    settings = _settings(
        registry=args.registry,
        model_ref=args.model,
        redis_url=args.redis_url,
        data_dir=args.data_dir,
    )
    return _serve(settings, args.host, args.port)


def cmd_backfill(args) -> int:
    settings = _settings(
        registry=args.registry,
        model_ref=args.model,
        redis_url=args.redis_url,
        data_dir=args.data_dir,
    )
    report, _ = _backfill(args.data, settings, args.users, args.holdout, args.chunk)
    print(
        f"users: {report.users}  sessions appended: {report.sessions}  "
        f"duplicates: {report.duplicates}  caches written: {report.caches}  "
        f"superseded: {report.superseded}"
    )
    return 0


def _settings(*, embedded: bool = False, **overrides):
    """Settings from the environment, with the flags that were given taking precedence;
    ``embedded`` forces the embedded Redis whatever the environment says (the demo)."""
    from pydantic import ValidationError

    from service.settings import Settings

    given = {k: v for k, v in overrides.items() if v is not None}
    if embedded:
        given["redis_url"] = None
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ValueError(f"invalid settings: {exc}") from None


def _serve(settings, host: str, port: int) -> int:
    import uvicorn

    from service.app import configure_logging, create_app

    configure_logging(settings.log_level)
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)
    return 0


def _backfill(data: Path, settings, users: int | None, holdout: str, chunk: int):
    import asyncio

    from service.app import redis_client, state_store
    from service.backfill import Holdout, backfill
    from service.embedded import EmbeddedRedis
    from service.runner import load_generation
    from training.dataset import PreparedDataset

    ds = PreparedDataset.load(data)
    generation = load_generation(
        settings.registry,
        settings.model_ref,
        device=settings.device.value,
        log_sessions=settings.log_sessions,
    )

    async def run():
        embedded = EmbeddedRedis(settings.data_dir) if settings.redis_url is None else None
        url = embedded.start() if embedded else settings.redis_url
        # Backfill runs long pipelines: a generous deadline, not the request-path one.
        client = redis_client(settings.model_copy(update={"redis_timeout_ms": 30_000}), url)
        try:
            store = state_store(settings, client)
            chosen = None if users is None else range(min(users, ds.n_users))
            return await backfill(
                ds, store, generation, chosen, holdout=Holdout(holdout), chunk=chunk
            )
        finally:
            await client.aclose()
            if embedded:
                embedded.stop()

    return asyncio.run(run()), ds.user_ids[0]


if __name__ == "__main__":
    sys.exit(main())
