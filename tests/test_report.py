"""`python -m nos.report` on the real tiny run of test_query.py (held-out funnel included)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from db.store import Store
from nos import report
from nos.report_table import num

from .conftest import RUN, in_process, run_module, tiny_search

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("fitness.png", "lineage.png", "search.png", "rollouts.png", "losses.png", "profile.png")


@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_search(tmp_path_factory)


@pytest.fixture(scope="session")
def made(tiny_db: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """A real `python -m nos.report` run: (folder, its JSON answer, its stderr)."""
    out = tmp_path_factory.mktemp("report") / "tiny"
    proc = run_module("nos.report", RUN, "--db", str(tiny_db), "--out", str(out), "--format", "json",
                      "--device", "cpu", "--rollout-horizons", "1,2")
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
    for key, method in (("best", f"#{data.champion['id']}"), ("adam", "adam"), ("randopt", "randopt"),
                        ("before", "before")):
        stored = data.comparison.result(method, 1.0).per_seed[position]
        label, pred, mse = ro.curves[key]
        if stored is None:
            assert pred is None, label
            continue
        assert pred is not None and pred.shape == (ro.target.numel() - ro.k,)
        assert mse == pytest.approx(stored, rel=1e-3), label


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


def test_user_errors(tiny_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    proc = run_module("nos.report", "no-such-run", "--db", str(tiny_db), "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no-such-run" in proc.stderr
    for args in (["--rollout-horizons", "7"], ["--rollout-horizons", "x"], ["--device", "tpu"]):
        code, stdout, err = in_process_report(capsys, RUN, "--db", str(tiny_db), "--out", str(out), *args)
        assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, (args, err)
    code, _, err = in_process_report(capsys, RUN, "--db", str(tmp_path / "missing.sqlite"))
    assert code == 2 and "does not exist" in err
    assert not out.exists()  # nothing written on a user error


# ---------------------------------------------------------------------- helpers


def in_process_report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return in_process(capsys, *args, main=report.main)


def copy_search(src: Path, dst: Path, name: str) -> None:
    """Copy the search part of run RUN (individuals with their sine evaluations, timestep stats,
    the Adam reference) into a new database as a run that is still running, via the Store API."""
    with Store(src, create=False) as a, Store(dst) as b:
        run = a.get_run(RUN)
        run_id = b.create_run(name, run["config"], run["seed"])
        rows = a.individuals(run["id"])
        slot_of = {r["id"]: r["slot"] for r in rows}
        keep = ("slot", "particle", "timestep", "mutation", "attempt", "genome", "expression", "latex",
                "genome_hash", "unflipped_hash", "status", "fitness", "lr", "sign", "mutation_kind", "error")
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
