"""README.md's measured-results tables are what benchmarks/readme_results.py renders from
benchmarks/results/*.json: a figure typed by hand, or a result file rerun without rerendering,
fails here with the diff."""
import subprocess
import sys

from conftest import REPO


def test_readme_results_match_the_result_files():
    check = subprocess.run([sys.executable, "benchmarks/readme_results.py", "--check"], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, ("README.md differs from the rendering; run "
                                   "`python benchmarks/readme_results.py`:\n" + check.stdout + check.stderr)
