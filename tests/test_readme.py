"""The README's Python snippets run as written (as lucidrains/vector-quantize-pytorch's tests/test_readme.py
does), so the front page cannot rot: every ```python block, in order, in one namespace, from a folder
where ``artifacts/pipeline/default`` is what ``make run`` leaves (here the tiny profile's run)."""

import os
import re

from common.provenance import REPO_ROOT

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def readme_snippets() -> list[str]:
    return BLOCK.findall((REPO_ROOT / "README.md").read_text())


def test_readme_has_the_two_snippets_users_need():
    snippets = readme_snippets()
    assert any("decode_from_indices" in s for s in snippets), "a snippet that tokenizes and decodes an action chunk"
    assert any("run_episode" in s for s in snippets), "a snippet that loads a trained policy and runs one episode"


def test_readme_snippets_run(tiny_run, tmp_path, monkeypatch, capsys):
    (tmp_path / "artifacts" / "pipeline").mkdir(parents=True)
    os.symlink(tiny_run["root"] / "artifacts", tmp_path / "artifacts" / "pipeline" / "default")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, code in enumerate(readme_snippets(), 1):
        exec(compile(code, f"README.md python block {number}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert re.search(r"8 layers: MSE \d\.\d\de-\d\d", printed), printed
    assert re.search(r"-> (success|failure) in \d+ steps", printed), printed


def test_committed_headline_matches_the_suite_comparisons():
    from common.pipeline.headline import headline_rows, headline_table

    results = REPO_ROOT / "results"
    assert (results / "headline" / "headline.md").read_text() == headline_table(headline_rows(results)), \
        "results/headline/ is stale: run python -m rsd_pipeline report"
    assert (results / "headline" / "headline.png").exists()
