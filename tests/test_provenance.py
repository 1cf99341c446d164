"""common/provenance.py: result files a benchmark writes (JSON + its markdown table) and what they record."""

import json

from common.provenance import provenance, write_results


def test_write_results_writes_json_and_one_table_and_prints_it(tmp_path, capsys):
    result = {"rows": [1, 2], "provenance": provenance(seed=3)}
    path = write_results(tmp_path / "new" / "dir", "bench", result, "| a |\n|---|\n\n")
    assert path == tmp_path / "new" / "dir" / "bench.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["rows"] == [1, 2] and on_disk["provenance"]["seed"] == 3 and on_disk["provenance"]["git_sha"]
    assert (path.parent / "bench.md").read_text() == "| a |\n|---|\n"  # one trailing newline, whatever the table ends with
    assert capsys.readouterr().out == "| a |\n|---|\n"
    assert not list(path.parent.glob("*.tmp"))  # the JSON is written whole (temp file + rename)
    write_results(tmp_path, "quiet", {}, "x", echo=False)
    assert capsys.readouterr().out == "" and (tmp_path / "quiet.md").read_text() == "x\n"
