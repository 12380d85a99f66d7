"""The ``mil`` command: each subcommand loads a config and calls one library function.

Heavy imports (torch, Lightning, timm) happen inside the subcommands so that
``mil --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence

from mil import __version__

logger = logging.getLogger("mil")

CONFIG_HELP = "YAML config file(s) and key=value overrides, merged in order (e.g. configs/examples/msi.yaml train.lr=1e-4)"


def _load(items: Sequence[str]):
    from mil.config import load_config

    return load_config(items)


def cmd_crossval(args: argparse.Namespace) -> None:
    from mil.crossval import run_crossval
    from mil.jobs import run_status

    cfg = _load(args.config)
    if args.launcher:
        from mil.launch import launch_crossval

        out = launch_crossval(cfg, args.launcher, folds=args.fold)
    else:
        out = run_crossval(cfg, folds=args.fold)
    status = run_status(out)
    if not status.pooled:
        print(f"fold(s) {', '.join(map(str, args.fold or []))} finished; {status.table().splitlines()[0]}")
        print(f"see `mil status {out}`; the last fold to finish writes the pooled results")
        return
    plots = ", ".join(sorted(p.name for p in out.glob("*.png")))
    print(f"cross-validation finished: {out}/summary.md, metrics.json, predictions.csv, {plots}")


def cmd_status(args: argparse.Namespace) -> None:
    from mil.jobs import run_status

    print(run_status(args.run_dir).table())


def cmd_train(args: argparse.Namespace) -> None:
    from mil.crossval import run_train
    from mil.fitting import model_files

    out = run_train(_load(args.config))
    files = list(model_files(out).values())
    print(f"model trained: {files[0]}" if len(files) == 1 else
          f"model trained: {len(files)} inner models averaged, {', '.join(str(f) for f in files)}")


def cmd_extract(args: argparse.Namespace) -> int:
    """Extract the slides; exit status 1 when any slide failed (the others' bags are written)."""
    from encoders.extract import run_extract  # the command layer is the only place mil meets encoders
    from mil.commands.failures import exit_status

    shard = _parse_shard(args.shard)
    summary = run_extract(_load(args.config), shard=shard)
    print(f"extraction finished: summary in {summary}")
    return exit_status("extract", [summary])


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict (embedding the slides first when given); exit status 1 when a slide failed to embed."""
    from mil.commands.failures import exit_status
    from mil.commands.predict import predict_from_slides

    out, summary = predict_from_slides(args.run_dir, args.config)
    print(f"predictions written: {out}/predictions.csv")
    return exit_status("predict", [summary])


def cmd_heatmap(args: argparse.Namespace) -> None:
    from mil.commands.heatmap import run_heatmap

    slides = list(args.slide or [])
    if args.slides:
        from mil.commands.heatmap import read_slide_list

        slides += read_slide_list(args.slides)
    formats = [f.strip() for item in args.format or ["png"] for f in item.split(",") if f.strip()]
    written = run_heatmap(args.run_dir, args.config, slides or None, top_k=args.top_k, out_dir=args.out,
                          target_class=args.target_class, top=args.top, formats=formats, scale=args.scale,
                          opacity=args.opacity)
    folders = sorted({str(p.parent) for p in written})
    print(f"heatmaps written: {len(written)} files in {', '.join(folders)}")


def cmd_view(args: argparse.Namespace) -> None:
    import socket

    from mil.view import open_viewer

    viewer = open_viewer(args.run_dir, args.config, host=args.host, port=args.port, predictions=args.predictions,
                         top_k=args.top_k)
    if args.host != "127.0.0.1":
        print(f"WARNING: serving on {args.host}, not only this machine: anyone who can reach it and has the link "
              "sees the slides. Prefer the default (127.0.0.1) and an SSH tunnel.", file=sys.stderr)
    print(f"mil view: serving {args.run_dir} (Ctrl-C to stop). From another machine, tunnel first:\n"
          f"    ssh -L {viewer.port}:127.0.0.1:{viewer.port} {socket.gethostname()}\nthen open\n    {viewer.url}",
          flush=True)
    viewer.serve_forever()


def cmd_report(args: argparse.Namespace) -> None:
    from mil.report import report_predictions

    out = report_predictions(args.predictions, target=args.target, classes=args.classes, out_dir=args.output_dir)
    print(f"report written to {out}")


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; exit status 1 when a generated slide failed to extract."""
    from mil.commands.demo import run_demo, summary
    from mil.commands.failures import exit_status

    result = run_demo(args.out, size=args.size, encoder=args.encoder, weights=args.weights)
    print(summary(result))
    return exit_status("demo", result.extract_summaries)


def cmd_import_bags(args: argparse.Namespace) -> None:
    from mil.importing import import_bags

    result = import_bags(
        args.source, args.out_dir, fmt=args.format, bag_column=args.bag_column, label_column=args.label_column,
        feature_columns=args.feature_columns, patient_column=args.patient_column, header=args.header,
        target=args.target, dtype=args.dtype,
    )
    print(f"imported {result.n_bags} bags ({result.n_instances} instances, {result.dim} features) of "
          f"{result.n_patients} patients into {result.out_dir}; labels {result.label_counts}")
    print("cross-validate with:  mil crossval CONFIG " + " ".join(shlex.quote(o) for o in result.config_overrides()))
    print(f"if CONFIG's cohort.classes are not {result.classes}, add:  {shlex.quote(result.classes_override())}"
          "  (reordered as you choose: the last is the positive class)")


def cmd_print_config(args: argparse.Namespace) -> None:
    from mil.config import to_yaml

    print(to_yaml(_load(args.config)), end="")


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser that accepts positionals (``key=value`` overrides, YAML files) before
    and after options, e.g. ``mil heatmap RUN cfg.yaml --slide X output_dir=/tmp/hm``
    (argparse's intermixed parsing)."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mil",
        description="Slide-level multiple-instance learning: slides -> tile embeddings -> attention-MIL predictions.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_IntermixedParser)

    def add(name: str, func: Callable[[argparse.Namespace], int | None], help: str,
            description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description)
        p.set_defaults(func=func)
        return p

    p = add("crossval", cmd_crossval, "cross-validate a cohort of bags",
            "Patient-level stratified k-fold cross-validation with an inner validation split for early stopping. "
            "Writes splits.yaml, fold_<k>/ (model, predictions, threshold in summary.json), predictions.csv (probabilities "
            "and the call pred_<target>), slide_predictions.csv (patient-level bags), metrics.json, summary.md, roc.png, "
            "pr.png, calibration.png, confusion.png. Rerunning into the same output_dir resumes. Folds can run as "
            "parallel jobs on one output_dir "
            "(--fold, --launcher); the last to finish writes the pooled results.")
    p.add_argument("config", nargs="+", help=CONFIG_HELP)
    p.add_argument("--fold", type=int, action="append", metavar="K",
                   help="run only fold K (0-based over all repeats, as listed in splits.yaml; repeatable), "
                        "e.g. --fold $SLURM_ARRAY_TASK_ID; any number of such jobs may share the output_dir")
    p.add_argument("--launcher", choices=["slurm", "local", "debug"],
                   help="submit one job per fold with submitit (resources from launcher.*), wait, and pool; "
                        "local: processes on this machine (needs submitit: pip install -e '.[slurm]' in the checkout)")
    add("status", cmd_status, "which folds of a crossval run are finished, running, failed or not started",
        "Read a `mil crossval` output folder: per fold, finished (predictions written), running (a job holds its "
        "lock), failed (with the last line of its error), interrupted (started, no job holds it) or not started; "
        "and whether the pooled results are written.").add_argument("run_dir", help="a `mil crossval` output folder")
    add("train", cmd_train, "train one model for deployment (a held-out validation split picks the epoch)",
        "Train a single model on all patients except a stratified validation split (cv.val_fraction), which picks "
        "the epoch and the decision threshold (task.threshold).",
        ).add_argument("config", nargs="+", help=CONFIG_HELP)
    p = add("extract", cmd_extract, "turn whole-slide images into HDF5 bags of tile embeddings",
            "Tissue detection, tiling at an exact mpp and tile embedding with a registered encoder (virchow2 by default). "
            "Finished bags are skipped, so a rerun resumes.")
    p.add_argument("config", nargs="+", help="YAML config file(s) and key=value overrides, merged in order (e.g. "
                   "configs/examples/extract_virchow2.yaml slides.dir=/data/slides features_dir=/data/virchow2)")
    p.add_argument("--shard", default="0/1", help="process shard i of n of the slides (e.g. 0/4); safe to run shards in parallel")
    p = add("predict", cmd_predict, "apply a trained run to a new cohort",
            "Predict with a `mil train` model or a `mil crossval` fold ensemble (mean of probabilities). The new cohort is "
            "given with cohort.* keys; with labels, metrics.json and ROC/PR plots are written too.")
    p.add_argument("run_dir", help="a finished `mil crossval` or `mil train` output folder")
    p.add_argument("config", nargs="+", help="YAML file(s) and key=value overrides for the new cohort, plus output_dir=...")
    p = add("heatmap", cmd_heatmap, "attention heatmaps, top/bottom tiles, per-tile scores and QuPath GeoJSON",
            "Per-tile attention of a trained run (averaged over fold models) drawn over each slide's thumbnail (shown "
            "beside it, with a scale bar), a grid of the top-k and bottom-k tiles, and <slide_id>_scores.csv (x, y, "
            "score); --format geojson adds <slide_id>_tiles.geojson (drag it onto the open slide in QuPath). Without "
            "the slide file, a scatter of the tiles with axes in µm. Without --slide/--slides/--top: every slide of "
            "the cohort. Writes to --out, else output_dir when overridden, else RUN_DIR/heatmaps.")
    p.add_argument("run_dir", help="a finished `mil crossval` or `mil train` output folder")
    p.add_argument("config", nargs="*", help="YAML file(s) and key=value overrides (e.g. cohort.*, slides.dir=...)")
    p.add_argument("--slide", action="append", help="slide id (repeat for several slides; default: every slide)")
    p.add_argument("--slides", metavar="FILE", help="file of slide ids, one per line (or a CSV with a slide_id column)")
    p.add_argument("--top", type=int, metavar="N",
                   help="only the slides of the N most confidently positive and N most confidently negative bags")
    p.add_argument("--format", action="append", metavar="FMT",
                   help="png (default) and/or geojson; repeat or comma-separate (e.g. --format png,geojson)")
    p.add_argument("--scale", default="slide", choices=["slide", "cohort"],
                   help="colour by the attention percentile within each slide (default), or across all slides drawn")
    p.add_argument("--opacity", type=float, default=0.5, help="opacity of the heat over the thumbnail (default 0.5)")
    p.add_argument("--top-k", type=int, default=8, help="tiles shown in the top and bottom rows (default 8)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--class", dest="target_class", help="class map for per-class models (default: the predicted class)")
    p = add("view", cmd_view, "review a run's predictions and attention on the slides, in a browser",
            "Serve a cohort page (label, fold, probability, called class per bag) and per slide a zoomable viewer "
            "(Deep Zoom from the slide file) with the attention overlay, tissue mask, hover read-out and top/bottom "
            "tiles. Listens on 127.0.0.1 with a random token in the printed link; reach it with an SSH tunnel.")
    p.add_argument("run_dir", help="a finished `mil crossval` or `mil train` output folder")
    p.add_argument("config", nargs="*", help="YAML file(s) and key=value overrides (e.g. slides.dir=..., cohort.*)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; another one exposes the slides to the network)")
    p.add_argument("--predictions", help="predictions.csv to show (default: the run's own, for the run's cohort)")
    p.add_argument("--top-k", type=int, default=12, help="tiles in the top and bottom galleries (default 12)")
    p = add("report", cmd_report, "metrics and plots for a predictions.csv",
            "Re-compute metrics with bootstrap intervals and redraw ROC, PR and calibration plots for any predictions.csv "
            "(from crossval or predict), or for a run folder.")
    p.add_argument("predictions", help="a predictions.csv or a run folder that holds one")
    p.add_argument("--target", help="label column (default: from the run's run.yaml)")
    p.add_argument("--classes", nargs="+", help="class order, last = positive (default: from run.yaml or sorted labels)")
    p.add_argument("--output-dir", help="where to write (default: beside the predictions)")
    p = add("demo", cmd_demo, "the whole pipeline on generated slides (a few minutes on a laptop CPU)",
            "Writes a synthetic cohort of pyramidal TIFF slides (planted tumour-like regions drive an MSI-like label) "
            "and an external cohort, then runs extract, crossval, predict, heatmap and report with configs/demo/*.yaml.")
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: a one-minute smoke test")
    p.add_argument("--encoder", default="random-vit-tiny",
                   help="tile encoder; e.g. virchow2 with --weights for real features (default: random-vit-tiny)")
    p.add_argument("--weights", help="encoder weights: a local folder/file or hf-hub:... id")
    p = add("import-bags", cmd_import_bags, "import your own instance features (CSV or PRTools .mat) as bags",
            "Write one HDF5 bag per bag id plus clinical.csv and slides.csv, ready for `mil crossval`. Columns are "
            "header names, or 0-based positions in a CSV without a header.")
    p.add_argument("source", help="a .csv table (one row per instance) or a PRTools .mat file")
    p.add_argument("out_dir", help="where to write features/, clinical.csv and slides.csv")
    p.add_argument("--format", default="auto", choices=["auto", "csv", "mat"])
    p.add_argument("--bag-column", help="bag id column (CSV)")
    p.add_argument("--label-column", help="bag label column (CSV)")
    p.add_argument("--feature-columns", nargs="+", help="feature columns (default: all other columns)")
    p.add_argument("--patient-column", help="patient/group column (default: each bag is its own patient)")
    p.add_argument("--header", action=argparse.BooleanOptionalAction, default=None,
                   help="whether the CSV has a header row (default: detect)")
    p.add_argument("--target", default="label", help="name of the label column written (default: label)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    add("print-config", cmd_print_config, "print the resolved config",
        "Merge the schema defaults, YAML files and overrides and print the result.",
        ).add_argument("config", nargs="*", help=CONFIG_HELP)
    return parser


def _quiet_third_party() -> None:
    """Keep the console to our own progress and results (``-v`` shows everything)."""
    import lightning  # noqa: F401  (its loggers must exist before their level is set)

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|num_workers).*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit status: 0; 1 when it finished but some items (slides) failed, each
    listed with its reason in the command's summary; 2 when a usage or config error stopped it."""
    args = build_parser().parse_args(argv)
    from mil.progress import LOG_DATEFMT, LOG_FORMAT

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=LOG_FORMAT,
        datefmt=LOG_DATEFMT,
    )
    if not args.verbose and args.command != "print-config":
        _quiet_third_party()
    try:
        status = args.func(args)
    except (ValueError, KeyError, FileNotFoundError, TypeError, ImportError) as e:
        if args.verbose:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mil {args.command}: error: {message}", file=sys.stderr)
        return 2
    return status or 0
