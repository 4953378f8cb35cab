"""benchmarks/_results.py (record, merge, atomic write) and benchmarks/report.py (rendering).

The committed docs/performance.md and README.md's Performance section must be exactly what report.py renders
from the committed benchmarks/results/*.json, so the published figures cannot drift from the data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from benchmarks import _results, report

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def _committed() -> list[dict[str, object]]:
    return report.load_results(RESULTS)


# ----------------------------------------------------------------------------- the committed files


def test_committed_page_is_rendered_from_the_committed_results() -> None:
    results = _committed()
    page = report.render_page(results, report.missing_benches(results))
    assert (ROOT / "docs" / "performance.md").read_text(encoding="utf-8") == page, (
        "docs/performance.md differs from benchmarks/results/*.json: run python benchmarks/report.py"
    )


def test_committed_readme_section_is_rendered_from_the_committed_results() -> None:
    results = _committed()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = report.render_readme_section(results, report.missing_benches(results))
    assert report.replace_section(readme, section) == readme, (
        "README.md's Performance section differs from benchmarks/results/*.json:"
        " run python benchmarks/report.py"
    )


def test_check_mode_passes_on_the_committed_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["--check"]) == 0
    assert capsys.readouterr().err == ""


def test_every_committed_headline_figure_carries_its_baseline() -> None:
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("bench_*.py")}
    results = _committed()
    assert results, "benchmarks/results/ holds no results"
    for result in results:
        assert result["bench"] in scripts, f"{result['bench']}.json has no benchmarks script"
        headline = [f for f in result["figures"] if f["headline"]]  # type: ignore[attr-defined]
        assert headline, f"{result['bench']} records no headline figure"
        for figure in headline:
            assert figure["baseline"], f"{result['bench']}: {figure['figure']} has no baseline"


# ----------------------------------------------------------------------------- record() and merging


def _run(note: str | None = None) -> dict[str, object]:
    run: dict[str, object] = {
        "id": "x",
        "date": "2026-01-02T03:04:05Z",
        "command": "python benchmarks/bench_x.py --n 5",
        "nproc": 2,
        "load_average": [0.5, 0.25, 1.0],
        "load_average_sampled": "at start",
    }
    if note:
        run["note"] = note
    return run


def _read(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    return data


def test_record_without_a_directory_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(_results.RESULTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert (
        _results.record(bench="bench_x", figure="f", value=1.0, unit="ratio", baseline="b") is None
    )
    assert list(tmp_path.iterdir()) == []


def test_record_writes_into_the_directory_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_results.RESULTS_ENV, str(tmp_path / "results"))
    path = _results.record(
        bench="bench_env_test",
        figure="f",
        value=0.123456789,
        unit="ratio",
        baseline="b",
        target=">= 0.1",
        met=True,
        headline=True,
    )
    assert path == tmp_path / "results" / "bench_env_test.json"
    data = _read(path)
    assert data["schema"] == _results.SCHEMA
    assert data["bench"] == "bench_env_test"
    assert data["figures"] == [
        {
            "figure": "f",
            "value": 0.123457,  # 6 significant digits
            "unit": "ratio",
            "baseline": "b",
            "target": ">= 0.1",
            "met": True,
            "headline": True,
        }
    ]
    run = data["run"]
    assert isinstance(run, dict)
    assert run["nproc"] >= 1
    assert len(run["load_average"]) == 3


def test_figures_of_one_run_merge_and_a_repeated_figure_replaces_its_value(tmp_path: Path) -> None:
    recorder = _results.Recorder(_run())
    for figure, value in (("a", 1.0), ("b", 2), ("a", 3.5)):
        recorder.record(
            bench="bench_x", figure=figure, value=value, unit="x", baseline="b", directory=tmp_path
        )
    data = _read(tmp_path / "bench_x.json")
    assert [(f["figure"], f["value"]) for f in data["figures"]] == [("a", 3.5), ("b", 2)]  # type: ignore[attr-defined,index]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_x.json"]  # no temporary file left


def test_a_new_run_replaces_the_figures_of_the_previous_one(tmp_path: Path) -> None:
    old = _results.Recorder({**_run(), "id": "old"})
    old.record(bench="bench_x", figure="old", value=1, unit="x", baseline=None, directory=tmp_path)
    old.record(bench="bench_y", figure="y", value=1, unit="x", baseline=None, directory=tmp_path)
    new = _results.Recorder({**_run(), "id": "new"})
    new.record(bench="bench_x", figure="new", value=2, unit="x", baseline=None, directory=tmp_path)
    data = _read(tmp_path / "bench_x.json")
    assert data["run"]["id"] == "new"  # type: ignore[index]
    assert [f["figure"] for f in data["figures"]] == ["new"]  # type: ignore[attr-defined,index]
    assert _read(tmp_path / "bench_y.json")["run"]["id"] == "old"  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bench": "../x"}, "file-name stem"),
        ({"value": math.nan}, "finite number"),
        ({"value": math.inf}, "finite number"),
        ({"value": True}, "finite number"),
        ({"met": True}, "names no target"),
    ],
)
def test_record_refuses_what_it_could_not_write_truthfully(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {
        "bench": "bench_x",
        "figure": "f",
        "value": 1.0,
        "unit": "ratio",
        "baseline": "b",
        "directory": tmp_path,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        _results.Recorder(_run()).record(**arguments)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_the_run_takes_the_load_average_and_note_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(_results.LOADAVG_ENV, "0.50 0.75 1.25 1/140 4242")
    monkeypatch.setenv(_results.NOTE_ENV, "smoke run")
    run = _results.describe_run()
    assert run["load_average"] == [0.5, 0.75, 1.25]
    assert run["load_average_sampled"] == "at start"
    assert run["note"] == "smoke run"
    monkeypatch.delenv(_results.LOADAVG_ENV)
    monkeypatch.delenv(_results.NOTE_ENV)
    run = _results.describe_run()
    assert run["load_average_sampled"] == "at import"
    assert "note" not in run
    monkeypatch.setenv(_results.LOADAVG_ENV, "high")
    with pytest.raises(ValueError, match="three numbers"):
        _results.describe_run()


def test_the_command_hides_a_password_in_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "sys.argv", ["benchmarks/bench_x.py", "--postgres", "postgresql://u:s3cret@127.0.0.1/db"]
    )
    command = _results.describe_run()["command"]
    assert "s3cret" not in command
    assert command.endswith("benchmarks/bench_x.py --postgres 'postgresql://u:***@127.0.0.1/db'")


# ----------------------------------------------------------------------------- report.py


def _results_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "results"
    recorder = _results.Recorder(_run(note="smoke run"))
    recorder.record(
        bench="bench_b",
        figure="b | c",
        value=0.8312,
        unit="ratio",
        baseline="x | y, same run",
        target="<= 3 at 100000 files",
        headline=True,
        directory=directory,
    )
    recorder.record(
        bench="bench_a",
        figure="rate",
        value=1790.5,
        unit="docs/s",
        baseline="raw verify",
        target=">= 500/s",
        met=False,
        headline=True,
        directory=directory,
    )
    recorder.record(
        bench="bench_a", figure="rss", value=43, unit="MiB", baseline=None, directory=directory
    )
    return directory


def test_the_page_has_one_table_per_bench_sorted_with_its_run(tmp_path: Path) -> None:
    results = report.load_results(_results_dir(tmp_path))
    page = report.render_page(results, ["bench_c"])
    assert page.index("## bench_a") < page.index("## bench_b")
    assert "| **rate** | 1,790 | docs/s | raw verify | >= 500/s | **no** |" in page
    assert "| rss | 43 | MiB | — | — | — |" in page
    assert "| **b \\| c** | 0.83 | ratio | x \\| y, same run | <= 3 at 100000 files | — |" in page
    assert (
        "Run 2026-01-02 03:04:05 UTC on 2 CPU(s), load average at start 0.50 / 0.25 / 1.00"
        " (1 / 5 / 15 min); command `python benchmarks/bench_x.py --n 5`." in page
    )
    assert "**Note** (every benchmark): smoke run." in page
    assert "No results recorded for `bench_c`" in page
    assert report.render_page(results, ["bench_c"]) == page  # deterministic


def test_the_readme_section_lists_headline_figures_with_baseline_and_target(
    tmp_path: Path,
) -> None:
    results = report.load_results(_results_dir(tmp_path))
    section = report.render_readme_section(results)
    assert section.startswith(report.BEGIN) and section.endswith(report.END)
    assert (
        "- `bench_a` rate: **1,790 docs/s** (baseline: raw verify; target >= 500/s: **not met**)"
        in section
    )
    assert (
        "- `bench_b` b | c: **0.83** (baseline: x | y, same run; target <= 3 at 100000 files:"
        " applies at another size)" in section
    )
    assert "rss" not in section  # not a headline figure
    assert "[docs/performance.md](docs/performance.md)" in section


def test_main_writes_once_and_then_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _results_dir(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{report.BEGIN}\nold\n{report.END}\n\n## More\n")
    page = tmp_path / "performance.md"
    argv = ["--results", str(results), "--page", str(page), "--readme", str(readme)]
    argv += ["--benchmarks", str(tmp_path)]
    assert report.main(argv) == 0
    assert capsys.readouterr().out.count("wrote") == 2
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\n<!-- bench:begin -->\n")
    assert text.endswith("<!-- bench:end -->\n\n## More\n")
    assert "old" not in text
    before = (page.read_text(), text)
    assert report.main(argv) == 0
    assert capsys.readouterr().out == ""
    assert (page.read_text(), readme.read_text()) == before
    assert report.main([*argv, "--check"]) == 0
    (results / "bench_a.json").unlink()
    assert report.main([*argv, "--check"]) == 1
    assert "out of date" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not readable JSON"),
        ('{"schema": 2}', "expected schema 1"),
        ('{"schema": 1, "bench": "other"}', "expected bench 'bench_z'"),
    ],
)
def test_an_unreadable_results_file_is_named_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    (tmp_path / "bench_z.json").write_text(content)
    with pytest.raises(report.ReportError, match=message):
        report.load_results(tmp_path)
    assert report.main(["--results", str(tmp_path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "bench_z.json" in err and message in err


def test_a_readme_without_markers_is_refused() -> None:
    with pytest.raises(report.ReportError, match="expected one <!-- bench:begin -->"):
        report.replace_section("# x\n", "section")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3, "3"),
        (12345, "12,345"),
        (1790.5, "1,790"),
        (35.94, "35.9"),
        (0.806, "0.81"),
        (0.0534, "0.053"),
        (0.0, "0.00"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert report.format_value(value) == text
