"""No committed result or doc names a folder of the machine it was made on.

Results and reports record paths under the repository repo-relative (``common.provenance.portable_path``,
applied by ``write_json`` and the markdown writers). A path outside the repository cannot be made portable:
committed files write it as ``<scratch>/<rest>``, the scratch root of the machine it was made on
(``/work/exp``, ``/tmp``, ``/root/out``) replaced by the placeholder and the rest kept, so
``/work/exp/s13/cl_states`` reads ``<scratch>/s13/cl_states`` and ``/tmp/abl/x`` reads ``<scratch>/abl/x``.

This test fails on any absolute filesystem path in the tracked (and not ignored, not yet committed)
``*.md`` / ``*.json`` files of results/, report/, docs/ and the guides, and names every offending file:line.
"""

import re
import subprocess

import pytest

from common.provenance import REPO_ROOT

# git pathspecs (a ``*`` also matches across folders): the committed results and every doc a reader opens
SCOPE = ("results/*.md", "results/*.json", "report/*.md", "report/*.json", "docs/*.md", "docs/*.json",
         "README.md", "MIGRATION_TO_ROBUST_RFSQ.md", "phase1_improved/*.md", "phase2_draft_retrain/*.md", "phase3/*.md",
         "benchmarks/*.md")

# An absolute path: a "/" that starts a token (not inside a word, a relative path, a URL, a glob, a template
# such as ${OUT}/x or the <scratch>/ placeholder) followed by a name.
ABSOLUTE = re.compile(r"(?<![\w.~:/*?<>{}()\[\]$-])/(?P<first>[A-Za-z_.~][\w.~+-]*)(?P<rest>(?:/[\w.~*+-]*)*)")
# Roots that only ever name a machine's folders: flagged even alone ("/tmp", "/work").
MACHINE_ROOTS = {"work", "tmp", "root", "home", "Users", "mnt", "private", "var", "opt", "srv", "scratch", "nfs", "gpfs"}
# Modal volume mounts, cited by the docs as commands to run (``modal run ... --data /data/libero_object_demos.hdf5``)
# and recorded by runs made on Modal: these paths mean the same folder on every Modal container, wherever
# the command is typed, so they name no machine of ours.
MODAL_VOLUMES = {"models", "data"}
OTHER = re.compile(r"file://|\b[A-Za-z]:\\\\?(?:Users|home)\b")  # file URLs, Windows home folders


def machine_paths(line: str) -> list[str]:
    """The absolute filesystem paths a line names, Modal volume paths left out."""
    found = []
    for m in ABSOLUTE.finditer(line):
        first, rest = m.group("first"), m.group("rest")
        if first in MODAL_VOLUMES:
            continue
        if first in MACHINE_ROOTS or rest.strip("/"):  # one bare name ("/results" of a doc marker) is no path
            found.append(m.group(0))
    found += [m.group(0) for m in OTHER.finditer(line)]
    return found


def scoped_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *SCOPE],
                             cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"{REPO_ROOT}: not a git checkout ({exc}); the committed files cannot be listed")
    return sorted({f for f in out.splitlines() if (REPO_ROOT / f).is_file()})  # a file deleted, not yet committed: gone


def test_the_detector_flags_machine_paths_and_allows_the_rest():
    assert machine_paths('"results_dir": "/work/main/artifacts/pipeline/quick/results",') == ["/work/main/artifacts/pipeline/quick/results"]
    assert machine_paths("Tokenizer `/tmp/abl/x/rfsq_robust_best.pt` (h)") == ["/tmp/abl/x/rfsq_robust_best.pt"]
    assert machine_paths("states recorded by /root/out/work/cl_states) x 5") == ["/root/out/work/cl_states"]
    assert machine_paths("see /tmp or /home/me") == ["/tmp", "/home/me"]
    assert machine_paths("/opt/data/x.hdf5,/srv/y") == ["/opt/data/x.hdf5", "/srv/y"]
    assert machine_paths("open file:///x/y") == ["file://"]
    for fine in ("modal run phase1_improved/collect_demos.py --data /data/libero_object_demos.hdf5",
                 "Volumes: `rsd-models` at `/models` and `rsd-data` at `/data`", "M=/models/vla",
                 "<!-- /results:phase2 -->", "`artifacts/pipeline/quick/models`", "`<scratch>/s13/cl_states`",
                 "https://github.com/lucidrains/vector-quantize-pytorch/blob/master/x.py", "19767 / 4970 steps, 1/2",
                 "runs/s*/phase2/train_summary.json", "${OUT}/x/y", "$(pwd)/a/b", "L / (L - a + c + v)", "and/or"):
        assert machine_paths(fine) == [], fine


def test_no_committed_result_or_doc_names_a_machine_path():
    files = scoped_files()
    assert any(f.startswith("results/") for f in files), "expected the committed results in scope"
    offending = [f"{rel}:{number}: {', '.join(found)}"
                 for rel in files
                 for number, line in enumerate((REPO_ROOT / rel).read_text(errors="replace").splitlines(), 1)
                 if (found := machine_paths(line))]
    assert not offending, ("absolute paths in committed files (record paths repo-relative with "
                           "common.provenance.portable_path; outside the repository write <scratch>/<rest>):\n"
                           + "\n".join(offending))
