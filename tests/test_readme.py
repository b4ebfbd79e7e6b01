"""README.md's two set-up commands are the ones CI and users run."""
import re

from tests.conftest import ROOT


def _commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    blocks = _commands()
    test_cmd = [b for b in blocks if "pytest" in b][0].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci


def test_readme_main_command_installs_cpu_torch_pin():
    main = [b for b in _commands() if "jobs.pipeline" in b][0]
    assert "-c constraints.txt" in main
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
