"""README.md's two set-up commands are the ones CI and users run."""
import os
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


def test_every_job_is_a_console_script_and_a_spark_submit_job():
    # before: jobs/submit.py refused vacuum, which the README's recipe says it runs like any job
    import configparser

    import jobs.submit

    jobs_dir = os.path.join(ROOT, "jobs")
    mains = sorted(name[:-3] for name in os.listdir(jobs_dir) if name.endswith(".py") and name != "submit.py"
                   and "\ndef main(" in open(os.path.join(jobs_dir, name)).read())
    assert mains and sorted(jobs.submit.JOBS) == mains
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert scripts == {f"i2i-{m}": f"jobs.{m}:main" for m in mains}
