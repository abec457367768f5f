"""`python -m nos.report` on the real tiny run of test_query.py (held-out funnel included)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from db.store import Store
from nos import report
from nos.ui.tables import num

from .conftest import REPO, RUN, in_process, run_module, tiny_search

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("fitness.png", "lineage.png", "search.png", "rollouts.png", "losses.png", "profile.png")
BASELINE_LABELS = ("Adam", "Adam + clip 1.0", "Adam + warmup-cosine", "Adam + clip + warmup-cosine")


@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_search(tmp_path_factory)


@pytest.fixture(scope="session")
def made(tiny_db: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """A real `python -m nos.report` run with rollouts: (folder, its JSON answer, its stderr).
    --rollout-horizons alone: naming horizons implies --rollouts."""
    out = tmp_path_factory.mktemp("report") / "tiny"
    proc = run_module("nos.report", RUN, "--db", str(tiny_db), "--out", str(out), "--format", "json",
                      "--device", "cpu", "--threads", "1", "--rollout-horizons", "1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return out, json.loads(proc.stdout), proc.stderr


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300, (path, img.shape)
    assert float(np.std(img[..., :3])) > 0.01, f"{path} is blank"


def test_report_files(made: tuple[Path, dict, str]) -> None:
    out, doc, stderr = made
    assert doc["out"] == str(out) and str(out) in stderr
    assert doc["files"] == [str(out / name) for name in (*PLOTS, "summary.md")]
    for name in PLOTS:
        check_png(out / name)
    summary = (out / "summary.md").read_text()
    for name in PLOTS:
        assert f"]({name})" in summary  # linked as a markdown image
    assert set(re.findall(r"\]\(([^)]+\.png)\)", summary)) == set(PLOTS)


def test_summary_agrees_with_database(made: tuple[Path, dict, str], tiny_db: Path) -> None:
    out, _, _ = made
    summary = (out / "summary.md").read_text()
    with Store(tiny_db, create=False) as store:
        data = report.load(store, RUN)
        counts = store.status_counts(data.run["id"])
    name = data.comparison.champion  # chosen on validation seeds
    assert name is not None and data.champion["id"] == int(name[1:])  # the funnel's champion
    best = data.champion
    assert f"# nos run `{RUN}`" in summary
    assert f"**#{best['id']}** (funnel champion" in summary
    assert f"python -m nos.export {best['id']} --db {tiny_db}" in summary
    assert best["expression"] in summary and best["latex"] in summary
    assert ", ".join(f"{k} {v}" for k, v in counts.items()) in summary
    assert "integrity pass rate" in summary and "duplicate rate" in summary
    # the test-seed table: a row per method, a column per horizon of the run's config
    horizons = data.config.heldout_horizons
    assert "| method " in summary and all(f"| t_max={h:g}" in summary for h in horizons)
    for label in ("before fine-tuning", "Adam", "Adam + clip 1.0", "Adam + warmup-cosine",
                  "Adam + clip + warmup-cosine", "RandOpt", f"#{best['id']} (champion)"):
        assert f"| {label} " in summary
    adam = data.comparison.result("adam", horizons[0])
    assert f"{num(adam.gmean)} [{num(adam.median)}]" in summary  # geometric mean [median] of the test seeds
    assert "95% bootstrap CI" in summary and "vs Adam + clip + warmup-cosine" in summary


def test_rollouts_reproduce_the_funnel(tiny_db: Path) -> None:
    """The rollouts drawn are the funnel's: same task, seed, budget, lr / sigma, hence the same loss."""
    with Store(tiny_db, create=False) as store:
        data = report.load(store, RUN)
    seed = data.config.test_seeds[0]
    ro = report.rollouts(data, data.config.protocol().evaluator("cpu"), 1.0, seed)
    assert ro.target.numel() == round(1.0 / ro.dt) and ro.k == data.config.setup().sine.k
    position = list(data.config.test_seeds).index(seed)
    keys = {"best", "adam", "adam_clip", "adam_wc", "adam_clip_wc", "randopt", "before"}
    assert set(ro.curves) == keys  # every pictured method, nothing else (the run has no published ones)
    for key in keys:
        method = f"#{data.champion['id']}" if key == "best" else key
        stored = data.comparison.result(method, 1.0).per_seed[position]
        label, pred, mse = ro.curves[key]
        if stored is None:
            assert pred is None, label
            continue
        assert pred is not None and pred.shape == (ro.target.numel() - ro.k,)
        assert mse == pytest.approx(stored, rel=1e-3), label
        assert ro.stored[key] == stored  # shown beside the retrained MSE only where they differ


def test_run_without_funnel(tiny_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run with no held-out results (here: the tiny run's search, copied as a run still going)
    gets fitness.png and lineage.png, and summary.md says why the other two are missing."""
    db = tmp_path / "copy.sqlite"
    copy_search(tiny_db, db, "searching")
    out = tmp_path / "rep"
    code, stdout, err = in_process_report(capsys, "searching", "--db", str(db), "--out", str(out),
                                          "--format", "json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["files"] == [str(out / f) for f in ("fitness.png", "lineage.png", "search.png", "summary.md")]
    check_png(out / "fitness.png")
    check_png(out / "lineage.png")
    check_png(out / "search.png")
    assert not (out / "rollouts.png").exists() and not (out / "losses.png").exists()
    summary = (out / "summary.md").read_text()
    assert "no held-out (funnel) results" in summary and "(best search fitness)" in summary
    assert "](fitness.png)" in summary and "](lineage.png)" in summary and "rollouts.png)" not in summary
    code, stdout, err = in_process_report(capsys, "searching", "--db", str(db), "--out", str(tmp_path / "r2"),
                                          "--rollouts")
    assert code == 2 and stdout == "" and "no held-out (funnel) results" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r2").exists()


def test_user_errors(tiny_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    proc = run_module("nos.report", "no-such-run", "--db", str(tiny_db), "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no-such-run" in proc.stderr
    for args in (["--rollout-horizons", "7"], ["--rollout-horizons", "x"], ["--device", "tpu"],
                 ["--rollouts", "--rollout-horizons", "1,7"], ["--rollouts", "--threads", "0"]):
        code, stdout, err = in_process_report(capsys, RUN, "--db", str(tiny_db), "--out", str(out), *args)
        assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, (args, err)
    code, _, err = in_process_report(capsys, RUN, "--db", str(tmp_path / "missing.sqlite"))
    assert code == 2 and "does not exist" in err
    assert not out.exists()  # nothing written on a user error


# ---------------------------------------------------------------------- no training by default

# `nos report` in a child process where everything that trains raises: the trainer, RandOpt,
# pretraining, and torch's autograd itself (any training needs a gradient)
NO_TRAINING = """
import sys

import torch

import nos.engine.trainer
import nos.report
import nos.tasks.randopt
import nos.tasks.sine
from nos.ui.cli import run_command


def refuse(*args, **kwargs):
    raise RuntimeError("nos report trained something")


trainers = (nos.engine.trainer.train, nos.tasks.randopt.randopt, nos.tasks.sine.pretrain_uncached)
for name, module in list(sys.modules.items()):
    if name.split(".")[0] in ("nos", "search_space"):
        for attr, value in list(vars(module).items()):
            if any(value is t for t in trainers):
                setattr(module, attr, refuse)
torch.autograd.grad = torch.autograd.backward = torch.Tensor.backward = refuse
sys.exit(run_command(nos.report.main, sys.argv[1:]))
"""


def report_without_training(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """The child above on `args`: its result and the CPU seconds it used (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", NO_TRAINING, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def folder_state(folder: Path) -> dict[str, str]:
    """Every file under a folder and a hash of its bytes (has anything been written there?)."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def test_no_training_without_rollouts(tiny_db: Path, tmp_path: Path) -> None:
    """By default the report reads stored results only: with training made impossible it still
    writes every picture but rollouts.png, in seconds of CPU, and says how to draw rollouts.png;
    with --rollouts the same child fails (the guard bites), and the real run draws it (`made`)."""
    before = folder_state(tiny_db.parent)
    out = tmp_path / "rep"
    proc, cpu = report_without_training(RUN, "--db", str(tiny_db), "--out", str(out), "--format", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cpu < 30, f"nos report took {cpu:.1f} s of CPU without --rollouts"
    doc = json.loads(proc.stdout)
    shown = [p for p in PLOTS if p != "rollouts.png"]
    assert doc["files"] == [str(out / name) for name in (*shown, "summary.md")]
    for name in shown:
        check_png(out / name)
    assert not (out / "rollouts.png").exists()
    summary = (out / "summary.md").read_text()
    command = f"python -m nos.report {RUN} --db {tiny_db} --out {out} --rollouts"
    notes = [line for line in summary.splitlines() if "rollouts.png" in line]
    assert notes == [f"rollouts.png was not drawn (it retrains every method at each held-out horizon, "
                     f"minutes per horizon on a CPU); draw it with `{command}`."]
    assert folder_state(tiny_db.parent) == before  # read-only: the database folder is untouched

    proc, _ = report_without_training(RUN, "--db", str(tiny_db), "--out", str(tmp_path / "ro"),
                                      "--rollouts", "--rollout-horizons", "1")
    assert proc.returncode != 0 and "nos report trained something" in proc.stderr
    assert not (tmp_path / "ro" / "rollouts.png").exists()


def test_rollouts_flag() -> None:
    parse = report._parser().parse_args
    assert not report.wants_rollouts(parse([RUN]))
    assert report.wants_rollouts(parse([RUN, "--rollouts"]))
    assert report.wants_rollouts(parse([RUN, "--rollout-horizons", "1"]))  # implied
    text = " ".join(report._parser().format_help().split())
    assert "retrains every method" in text and "minutes per horizon" in text and "--threads" in text


# ---------------------------------------------------------------------- what the pictures show


def test_losses_show_every_method(tiny_db: Path) -> None:
    """losses.png: the champion, all five baselines and "before", each in its own style, with a
    dot per test seed; the published optimizers too when the comparison has them."""
    with Store(tiny_db, readonly=True) as store:
        data = report.load(store, RUN)
    champion = f"#{data.champion['id']} (champion)"
    fig = report.losses_figure(data)
    labels = report.legend_labels(fig)
    assert champion in labels and "before fine-tuning" in labels
    assert all(b in labels for b in BASELINE_LABELS), labels
    assert [x for x in labels if x.startswith("RandOpt")], labels
    assert len(labels) == 7
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() in labels]
    assert len({(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines}) == len(lines) == 7
    dots = sum(len(c.get_offsets()) for c in fig.axes[0].collections)
    assert dots == sum(1 for r in data.comparison.methods for x in r.per_seed if x is not None and x > 0)

    # a run tuned with --published: the comparison has NOS's published optimizers too (here their
    # rows are Adam's, renamed: the picture only has to draw what the comparison holds)
    cmp = data.comparison
    extra = [dataclasses.replace(r, method=m) for r in cmp.methods if r.method == "adam"
             for m in ("nos_opt5", "nos_opt6", "nos_opt7", "nos_adamclip")]
    data.comparison = dataclasses.replace(cmp, methods=[*cmp.methods, *extra])
    labels = report.legend_labels(report.losses_figure(data))
    assert len(labels) == 11 and all(f"{m} (published)" in labels
                                     for m in ("NOS Opt5", "NOS Opt6", "NOS Opt7", "NOS AdamClip")), labels


@pytest.fixture(scope="module")
def with_control(tiny_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny database with a finished random-search run `ctl` of the same size whose
    individuals are the tiny run's own: the two search curves coincide exactly."""
    db = tmp_path_factory.mktemp("control") / "nos.sqlite"
    backup(tiny_db, db)
    copy_search(tiny_db, db, "ctl", algorithm="random")
    with Store(db, create=False) as store:
        store.set_run_status(store.get_run("ctl")["id"], "finished")
    return db


def test_search_shows_coinciding_control(with_control: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with Store(with_control, readonly=True) as store:
        data = report.load(store, RUN)
        data.diagnostics = report.diagnostics(store, data.run)
    assert data.diagnostics["control"]["best_so_far"] == data.diagnostics["best_so_far"]
    ax = report.search_figure(data).axes[0]
    ctl, ga = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    assert "ctl (random-search control" in ctl.get_label() and ga.get_label() == f"{RUN} (ga)"
    assert list(ctl.get_ydata()) == list(ga.get_ydata())  # they coincide ...
    # ... and both show: the control underneath, wider and dashed, the run on top, solid
    assert ctl.get_zorder() < ga.get_zorder() and ctl.get_linewidth() > ga.get_linewidth()
    assert ctl.get_linestyle() == "--" and ga.get_linestyle() == "-"
    assert "vs random-search control 'ctl'" in ax.get_title()

    out = tmp_path / "rep"
    code, _, err = in_process_report(capsys, RUN, "--db", str(with_control), "--out", str(out))
    assert code == 0, err
    summary = (out / "summary.md").read_text()
    assert "- random-search control: run `ctl`" in summary
    assert "beside the random-search control `ctl`" in summary  # search.png's caption


def test_no_control_said_only_in_the_picture(made: tuple[Path, dict, str], tiny_db: Path) -> None:
    """Without a control, search.png says so and summary.md does not mention one."""
    out, _, _ = made
    body = (out / "summary.md").read_text().split("## Configuration")[0].lower()
    assert "random search" not in body and "random-search" not in body and "control" not in body
    with Store(tiny_db, readonly=True) as store:
        data = report.load(store, RUN)
        data.diagnostics = report.diagnostics(store, data.run)
    fig = report.search_figure(data)
    assert "no random-search control of the same size in this database" in report.legend_labels(fig)
    assert "(no random-search control)" in fig.axes[0].get_title()


def test_readonly_database(tiny_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A database file mode 0444 in a folder mode 0555: the report reads it and writes nothing there."""
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "nos.sqlite"
    backup(tiny_db, db)
    db.chmod(0o444)
    folder.chmod(0o555)
    try:
        # root (with CAP_DAC_OVERRIDE) writes through file modes: nothing would be tested
        if os.geteuid() == 0 and os.access(folder, os.W_OK):
            pytest.skip("running as root, which writes through file permissions: run as another user "
                        "(or as root without CAP_DAC_OVERRIDE) to test a read-only database")
        before = folder_state(folder)
        out = tmp_path / "rep"
        code, _, err = in_process_report(capsys, RUN, "--db", str(db), "--out", str(out))
        assert code == 0, err
        assert (out / "summary.md").exists() and (out / "losses.png").exists()
        assert folder_state(folder) == before
    finally:
        folder.chmod(0o755)
        db.chmod(0o644)


# ---------------------------------------------------------------------- helpers


def in_process_report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return in_process(capsys, *args, main=report.main)


def backup(src: Path, dst: Path) -> None:
    """A consistent copy of an SQLite database (SQLite's backup: a -wal file's pages included)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


def copy_search(src: Path, dst: Path, name: str, **config: object) -> None:
    """Copy the search part of run RUN (individuals with their sine evaluations, timestep stats,
    the Adam reference) into a database as a run that is still running, via the Store API
    (`config`: fields of the copy's config to change, e.g. algorithm="random")."""
    with Store(src, readonly=True) as a, Store(dst) as b:
        run = a.get_run(RUN)
        run_id = b.create_run(name, {**run["config"], **config}, run["seed"])
        rows = a.individuals(run["id"])
        slot_of = {r["id"]: r["slot"] for r in rows}
        keep = ("slot", "particle", "timestep", "mutation", "attempt", "genome", "expression", "latex",
                "genome_hash", "unflipped_hash", "status", "fitness", "fidelity", "lr", "sign", "mutation_kind", "error")
        copies = []
        for r in rows:
            evaluations = [
                {k: e[k] for k in ("task", "horizon", "lr", "seed", "loss", "steps", "seconds")}
                for e in a.get_individual(r["id"])["evaluations"] if e["task"] == "sine"
            ]
            row = {**{k: r[k] for k in keep}, "run_id": run_id, "evaluations": evaluations}
            if r["parent_id"] is not None:
                row["parent_slot"] = slot_of[r["parent_id"]]
            copies.append(row)
        b.add_individuals(copies)
        for s in a.timestep_stats(run["id"]):
            b.put_timestep_stats(run_id, {k: v for k, v in s.items() if k not in ("id", "run_id", "created_at")})
        b.add_baselines([{k: v for k, v in x.items() if k not in ("id", "created_at")} | {"run_id": run_id}
                         for x in a.baselines(run["id"], task="sine_search")])
