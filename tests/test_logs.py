"""start_job, what every workflow script does first: the rule's log and torch's threads."""

import subprocess
import sys

import torch
from vlmdiff.logs import start_job


def test_start_job_logs_to_the_rule_log_and_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        log = start_job(tmp_path / "logs" / "job.log", 1)
        log("hello")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "hello" in (tmp_path / "logs" / "job.log").read_text()


def test_start_job_without_threads_leaves_torch_unimported(tmp_path):
    code = ("import sys; from vlmdiff.logs import start_job; start_job(sys.argv[1])('x'); "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "job.log")],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
    assert "x" in (tmp_path / "job.log").read_text()
