"""The local pipeline and the docs generator.

    python -m rsd_pipeline run [--profile default|quick|spatial|tiny] [--sequential]   # what `make run` / `make run QUICK=1` call
    python -m rsd_pipeline run --profile spatial --plan         # which stages would run, and why; runs nothing
    python -m rsd_pipeline report                               # regenerate the results sections of the docs
    python -m rsd_pipeline check-docs                           # exit 1 if a generated section is stale

``run`` keeps its data, models and results under ``artifacts/pipeline/<profile>/`` (reused on a
rerun when unchanged) and writes ``REPORT.md`` with the plots and the JSON behind every number:
``report/`` for the default profile (committed), ``report/<profile>/`` for the others, so a quick
run never overwrites the committed default report.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import rsd_entry
from common.pipeline.headline import write_headline
from common.pipeline.docs import stale_sections, update_docs
from common.pipeline.run import PROFILES, run_pipeline
from common.provenance import REPO_ROOT


def default_report_dir(profile: str) -> Path:
    return REPO_ROOT / "report" if profile == "default" else REPO_ROOT / "report" / profile


def plan_summary(plan: dict, root: Path) -> str:
    """One line for a plan: how many stages would run and the time they took when they last ran."""
    todo = {name: t for name, t in plan.items() if not t["skipped"]}
    if not todo:
        return f"every stage under {root} is up to date: `run` would only rewrite the report"
    known = [t["seconds"] for t in todo.values() if t["seconds"] is not None]
    never = [name for name, t in todo.items() if t["seconds"] is None]
    line = f"{len(todo)} of {len(plan)} stages would run under {root}: {', '.join(todo)}"
    if known:
        line += f"; they took {sum(known) / 60:.1f} min when they last ran (one after the other)"
    if never:
        line += f"; never run here: {', '.join(never)}"
    return line


def profile_help() -> str:
    """``--profile``'s help, from the profiles themselves (so it cannot drift from them)."""
    def n(count: int, what: str) -> str:
        return f"{count} {what}{'' if count == 1 else 's'}"

    described = "; ".join(f"{p.name}: {p.suite} tasks {p.tasks}, per task {n(p.demos_per_task, 'demo')} and "
                          f"{n(p.eval_trials, 'trial')}, {n(p.policy_epochs, 'policy epoch')}" for p in PROFILES.values())
    return (f"which settings to run ({described}); each keeps its own artifacts/pipeline/<profile>/ and report "
            "(report/ for default, report/<profile>/ otherwise) (default: default)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsd_pipeline", description=__doc__.split("\n")[0])
    rsd_entry.add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the local pipeline")
    run.add_argument("--profile", choices=sorted(PROFILES), default="default", help=profile_help())
    run.add_argument("--root", default="", help="artifacts folder (default artifacts/pipeline/<profile>); one run at a time "
                     "works in it (a second is refused while the first runs)")
    run.add_argument("--layout", choices=("dct", "chunk", "timestep"), default="",
                     help="tokenizer layout for this run (default: the profile's)")
    run.add_argument("--report-dir", default="", help="report folder (default: report/ for the default profile, report/<profile>/ otherwise)")
    run.add_argument("--sequential", action="store_true",
                     help="train the naive and the robust branch one after the other (default: side by side, one process "
                          "each, when the profile has 2 workers; each branch's output goes to <root>/logs/)")
    run.add_argument("--plan", action="store_true",
                     help="list the stages that would run and why (with the time each took when it last ran); run and write nothing")
    report = sub.add_parser("report", help="rebuild results/headline/ from the suite comparisons, then regenerate the results sections of the docs")
    check = sub.add_parser("check-docs", help="fail if a generated docs section differs from the results")
    for subcommand in (run, report, check):
        rsd_entry.add_debug_flag(subcommand)
    args = parser.parse_args(argv)

    if args.command == "run":
        profile = PROFILES[args.profile]
        if args.layout:
            profile = dataclasses.replace(profile, layout=args.layout)
        root = Path(args.root) if args.root else REPO_ROOT / "artifacts" / "pipeline" / profile.name
        report_dir = Path(args.report_dir) if args.report_dir else default_report_dir(profile.name)
        if args.plan:
            print(plan_summary(run_pipeline(profile, root=root, report_dir=report_dir, plan=True)["plan"], root))
            return 0
        rsd_entry.setup_process(torch_threads=1)  # tiny models: one thread is fastest (and what every stage assumes)
        summary = run_pipeline(profile, root=root, report_dir=report_dir, branches=1 if args.sequential else None)
        print(f"pipeline ({profile.name}) finished in {summary['wall_seconds'] / 60:.1f} min; report: {report_dir / 'REPORT.md'}")
        return 0
    if args.command == "report":
        if write_headline(REPO_ROOT / "results"):
            print("headline table rewritten: results/headline/")
        changed = update_docs()
        print("updated: " + (", ".join(changed) if changed else "nothing (docs already current)"))
        return 0
    stale = stale_sections()
    if stale:
        print("stale generated sections (run `python -m rsd_pipeline report`): " + ", ".join(stale))
        return 1
    print("docs current")
    return 0


def _cli(argv: list[str]) -> None:
    code = main(argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    rsd_entry.main(_cli, sys.argv[1:])
