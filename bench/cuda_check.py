"""Fit every library model with its data on an accelerator: the device-agnostic promise, checked end to end.

``python -m bench.cuda_check [--device cuda] [--only NAME ...] [--generative]`` simulates each model of
``ppl.models`` (seed 0, on the CPU: the simulators draw from CPU generators), moves the data, the true parameters
and any network in the model's arguments to ``--device`` (``Simulated.to``), then compiles and fits it with the module's
``infer_options`` exactly as ``tests/models/test_library.py`` does on the CPU. A row passes when

- the backend is the module's ``EXPECTED_BACKEND``,
- every recovery error is below the module's tolerance (the CPU test's numbers), and
- the posterior's draws (``post.sample(4)``) live on the data's device.

It prints one row per model (backend, seconds, errors, draws' devices) and exits with status 1 if any row fails.
The test suite parametrizes the structured-VAE and kernel tests over CUDA (``tests/conftest.py``); this script
covers the rest of the library, whose tests run on the CPU only. No benchmark cases (``bench.run`` skips it):
it needs a device this project's machines usually lack.
"""
from __future__ import annotations

import argparse
import importlib
import time
import traceback

import pyro
import torch
import ppl
from ppl.models import GENERATIVE_MODULES, MODEL_MODULES, NEURAL_MODULES


def draw_devices(post) -> set[str]:
    """The devices of the tensors among four posterior draws (latent sites; empty for a point-mass-free fit)."""
    return {str(v.device) for v in post.sample(4, seed=0).values() if isinstance(v, torch.Tensor)}


def check_model(name: str, device: torch.device) -> dict:
    """Simulate, move to ``device``, compile, fit and score ``ppl.models.<name>``: a row of the report."""
    module = importlib.import_module(f"ppl.models.{name}")
    sim = module.simulate(seed=0)
    sim = sim.to(device)
    pyro.clear_param_store()
    torch.manual_seed(0)
    start = time.perf_counter()
    plan = ppl.compile(module.model, *sim.args, **sim.kwargs)
    post = ppl.infer(module.model, *sim.args, model_kwargs=sim.kwargs, progress=False, **module.infer_options(sim))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    errors = module.recovery_errors(post, sim)
    devices = draw_devices(post)
    failures = [f"{k} {v:.3g} >= {module.TOLERANCES[k]}" for k, v in errors.items() if not v < module.TOLERANCES[k]]
    if plan.backend != module.EXPECTED_BACKEND:
        failures.append(f"backend {plan.backend} != {module.EXPECTED_BACKEND}")
    if devices - {str(torch.empty(0, device=device).device)}:
        failures.append(f"draws on {sorted(devices)}")
    return dict(name=name, backend=plan.backend, seconds=seconds, devices=sorted(devices), failures=failures,
                errors=", ".join(f"{k} {v:.3g}" for k, v in errors.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", nargs="*", default=None, help="model names (default: the whole library)")
    parser.add_argument("--generative", action="store_true", help="include the GAN, discrete VAE and RBM (minutes)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = args.only or list(MODEL_MODULES) + list(NEURAL_MODULES) + (list(GENERATIVE_MODULES) if args.generative
                                                                       else [])
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    failed = []
    for name in names:
        try:
            row = check_model(name, device)
        except Exception:  # a crash is a failed row; the others still run
            print(f"| {name} | CRASHED |\n{traceback.format_exc()}", flush=True)
            failed.append(name)
            continue
        status = "ok" if not row["failures"] else "FAILED: " + "; ".join(row["failures"])
        print(f"| {name} | {row['backend']} | {row['seconds']:.1f} s | {row['errors']} | draws on "
              f"{','.join(row['devices']) or '-'} | {status} |", flush=True)
        if row["failures"]:
            failed.append(name)
    print(f"{len(names) - len(failed)} of {len(names)} passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
