"""``python -m rwkv_ops`` (also the ``rwkv-ops`` command): what is installed, what runs, is it right.

Prints the framework versions, devices, the kernel types each installed backend can run here and
which one the defaults pick; checks each backend's default op against the float64 reference on a
small random problem (forward and, where the framework has them, all gradients) and times it.
Exits non-zero when a check fails. ``rwkv-ops bench`` runs the benchmark (see ``rwkv_ops.bench``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
from importlib import metadata

from rwkv_ops.common.environment import BACKENDS, install_command, read_environment

PACKAGES = ("rwkv-ops", "rwkv-ops-common", "rwkv-ops-numpy", "rwkv-ops-torch", "rwkv-ops-jax",
            "rwkv-ops-tensorflow")
WORKER_TIMEOUT_S = 600


def installed_backends():
    return [b for b in BACKENDS if importlib.util.find_spec(f"rwkv_ops.{b}") is not None]


def run_worker(backend: str, kernel_type=None) -> dict:
    cmd = [sys.executable, "-m", "rwkv_ops._worker", backend, kernel_type or "auto"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"backend": backend, "error": f"timed out after {WORKER_TIMEOUT_S} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RWKV_OPS_REPORT "):
            return json.loads(line[len("RWKV_OPS_REPORT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"backend": backend, "error": f"worker exited with {proc.returncode}: " + " | ".join(tail)}


def _fmt_time(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def doctor(args) -> int:
    print(f"rwkv-ops self-check (Python {platform.python_version()}, {platform.machine()})")
    print("\nPackages:")
    for name in PACKAGES:
        try:
            print(f"  {name:22s} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"  {name:22s} not installed")
    try:
        env = read_environment()
    except ValueError as error:
        print(f"\n{error}")
        return 2
    print(f"\nDispatcher: backend = {env.backend}, KERNEL_TYPE = {env.kernel_type or 'unset (fastest available)'}")
    for message in env.warnings:
        print(f"  warning: {message}")
    if importlib.util.find_spec("rwkv_ops.numpy") is None:
        print(f"\nThe self-check needs the float64 reference: {install_command('numpy')}")
        return 2
    backends = [args.backend] if args.backend else installed_backends()
    if env.backend not in backends:
        print(f"\nThe selected backend '{env.backend}' is not installed: {install_command(env.backend)}")
    failed = False
    for backend in backends:
        kernel_type = args.kernel_type or (env.kernel_type if backend == env.backend else None)
        print(f"\n[{backend}]{'  <- dispatcher default' if backend == env.backend else ''}")
        sys.stdout.flush()
        report = run_worker(backend, kernel_type)
        if "error" in report:
            failed = True
            print(f"  FAILED: {report['error']}")
            if args.verbose and "traceback" in report:
                print(report["traceback"])
            continue
        versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        print(f"  versions: rwkv-ops-{backend} {report['package_version']}; {versions}")
        print(f"  devices: {'; '.join(report['devices'])}")
        print(f"  kernel types available here (fastest first): {', '.join(report['available_kernel_types'])}")
        print(f"  default picks: {report['kernel_type']}")
        check = report["check"]
        status = "ok" if check["passed"] else "FAILED"
        worst_name = max(check["errors"], key=check["errors"].get)
        print(f"  check vs float64 reference ({check['dtype']}, B={check['shape']['B']} T={check['shape']['T']} "
              f"H={check['shape']['H']} K={check['shape']['K']}, seed {check['seed']}): {status}, worst relative "
              f"error {check['worst']:.2e} ({worst_name}), tolerance {check['tolerance']:.0e}")
        if args.verbose:
            print("    " + ", ".join(f"{k} {v:.1e}" for k, v in check["errors"].items()))
        timing = report["timing"]
        shape = timing["shape"]
        print(f"  time ({timing['dtype']}, B={shape['B']} T={shape['T']} H={shape['H']} K={shape['K']}): "
              f"fwd {_fmt_time(timing['fwd_s'])}, fwd+bwd {_fmt_time(timing.get('fwd_bwd_s'))}")
        failed |= not check["passed"]
    print("\nresult:", "FAILED" if failed else "all checks passed")
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from rwkv_ops import bench

        return bench.main(argv[1:])
    parser = argparse.ArgumentParser(prog="rwkv-ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, help="check only this backend")
    parser.add_argument("--kernel-type", choices=("triton", "cuda", "native"), help="check this kernel type")
    parser.add_argument("-v", "--verbose", action="store_true", help="per-tensor errors and tracebacks")
    args = parser.parse_args(argv)
    return doctor(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
