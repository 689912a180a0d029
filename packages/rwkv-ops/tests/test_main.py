"""`python -m rwkv_ops` (the self-check) and `rwkv-ops bench` on this machine."""

import json
import subprocess
import sys


def test_self_check_passes_and_reports(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rwkv_ops", "--backend", "numpy", "-v"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for expected in ("Packages:", "rwkv-ops-numpy", "Dispatcher: backend =", "[numpy]",
                     "kernel types available here (fastest first): native", "default picks: native",
                     "check vs float64 reference", ": ok, worst relative error", "time (float32",
                     "result: all checks passed"):
        assert expected in out, f"missing {expected!r} in:\n{out}"


def test_self_check_fails_loudly_on_bad_environment():
    proc = subprocess.run([sys.executable, "-m", "rwkv_ops"], capture_output=True, text=True, timeout=300,
                          env={"KERNEL_TYPE": "fastest", "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "KERNEL_TYPE='fastest' is not valid" in proc.stdout


def test_bench_quick_numpy(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "rwkv_ops", "bench", "--quick", "--impl", "numpy:native",
                           "--json", str(out_json)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| rwkv-ops 0.1.0 numpy native |" in proc.stdout
    # each implementation's row also goes to stderr as soon as it is measured (a run stopped from
    # outside keeps what it measured)
    assert "| rwkv-ops 0.1.0 numpy native |" in proc.stderr
    rows = json.loads(out_json.read_text())["rows"]
    timing = next(r for r in rows if r["kind"] == "time")
    error = next(r for r in rows if r["kind"] == "error")
    assert timing["fwd_ms"] > 0 and error["worst"] < 1e-5


def test_bench_failure_is_a_row_not_a_crash(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rwkv_ops", "bench", "--quick", "--impl", "numpy:triton",
                           "--no-error", "--json", str(tmp_path / "b.json")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1
    assert "failed: KernelUnavailableError" in proc.stdout
